"""Tokenizer and chat template, built from the model file itself (GGUF metadata or tokenizer.json).

Two rules the rest of the sidecar relies on:
- Text that comes from a player is literal. `<|im_end|>` typed in a message is tokenized as the
  characters `<`, `|`, `im`, ... and never as the control token; only the chat template itself
  may emit control tokens.
- Streaming text never contains half a UTF-8 character (`Detokenizer`).
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HfTokenizer

from sidecar.errors import ModelFileError, UserError
from sidecar.model.vocab import GgufVocab, HfTokenizerFiles

if TYPE_CHECKING:
    from sidecar.model.checkpoint import Checkpoint

_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(split: str | None = None, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    return pre_tokenizers.Sequence(steps)


# llama.cpp's `tokenizer.ggml.pre` names -> how that vocabulary's merges were learned.
# "smollm" is SmolLM's tokenizer.json: each digit alone, then GPT-2's byte-level split.
_PRE_TOKENIZERS = {
    "default": lambda: _byte_level(),
    "gpt2": lambda: _byte_level(),
    "gpt-2": lambda: _byte_level(),
    "smollm": lambda: _byte_level(digits=True),
    "llama-bpe": lambda: _byte_level(_LLAMA3_SPLIT),
    "llama3": lambda: _byte_level(_LLAMA3_SPLIT),
    "llama-v3": lambda: _byte_level(_LLAMA3_SPLIT),
    "smaug-bpe": lambda: _byte_level(_LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level(_QWEN2_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Sentencepiece files list no merges: every split of a token into two tokens is a merge,
    ranked by the merged token's score (the usual conversion, as in HF's converters)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in merges]


def _from_gguf_vocab(v: GgufVocab, path: object) -> tuple[HfTokenizer, list[str], str]:
    """(tokenizer, special token strings, kind) from GGUF metadata."""
    types = v.token_types or [1] * len(v.tokens)
    if v.model == "gpt2":
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in v.tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        merges = [tuple(m.split(" ", 1)) for m in v.merges]
        if v.pre not in _PRE_TOKENIZERS:
            raise ModelFileError(path, f"unsupported pre-tokenizer {v.pre!r} (tokenizer.ggml.pre); "
                                       f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}")
        tok = HfTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=v.pre in ("llama-bpe", "llama3")))
        tok.pre_tokenizer = _PRE_TOKENIZERS[v.pre]()
        tok.decoder = decoders.ByteLevel()
        kind = "byte_level"
    elif v.model == "llama":
        vocab = {t: i for i, t in enumerate(v.tokens)}
        merges = _merges_from_scores(v.tokens, v.scores or [0.0] * len(v.tokens))
        tok = HfTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                     unk_token=v.tokens[0]))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        kind = "sentencepiece"
    else:
        raise ModelFileError(path, f"unsupported tokenizer model {v.model!r} (tokenizer.ggml.model); "
                                   "supported: gpt2, llama")
    special = [t for t, ty in zip(v.tokens, types, strict=False) if ty == _CONTROL]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user_defined = [t for t, ty in zip(v.tokens, types, strict=False) if ty == _USER_DEFINED]
    if user_defined:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    return tok, special, kind


def _from_hf_files(files: HfTokenizerFiles) -> tuple[HfTokenizer, list[str], str]:
    tok = HfTokenizer.from_file(str(files.tokenizer_json))
    spec = json.loads(files.tokenizer_json.read_text())
    special = [a["content"] for a in spec.get("added_tokens", []) if a.get("special")]
    decoder = json.dumps(spec.get("decoder") or {})
    kind = "byte_level" if "ByteLevel" in decoder else "sentencepiece"
    return tok, special, kind


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class Tokenizer:
    def __init__(self, checkpoint: Checkpoint):
        src = checkpoint.tokenizer
        if isinstance(src, GgufVocab):
            self._tok, special, self.kind = _from_gguf_vocab(src, checkpoint.path)
            self.bos_id = src.bos_id
            self.add_bos = src.add_bos
        else:
            self._tok, special, self.kind = _from_hf_files(src)
            self.bos_id = self._tok.token_to_id(src.bos_token) if src.bos_token else None
            self.add_bos = src.add_bos
        # A second instance that treats special-token strings as ordinary text: for player text.
        self._literal = HfTokenizer.from_str(self._tok.to_str())
        self._literal.encode_special_tokens = True
        self.special_tokens = frozenset(special)
        self.special_ids = frozenset(self._tok.token_to_id(s) for s in special)
        self._special_pattern = (
            re.compile("|".join(re.escape(s) for s in sorted(special, key=len, reverse=True))) if special else None
        )
        self.eos_ids = tuple(checkpoint.eos_ids)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.chat_template = checkpoint.chat_template
        self.token_bytes = self._token_bytes()

    # --- encoding ---------------------------------------------------------------------------

    def encode_literal(self, text: str) -> list[int]:
        """Text as text: special-token strings inside it become ordinary tokens."""
        return self._literal.encode(text, add_special_tokens=False).ids

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one tokenizer per process; a game sends the same lists every turn)
    def can_write(self, text: str) -> bool:
        """Whether the model's tokens can spell `text` exactly (some byte-level vocabularies lack a few bytes)."""
        return self.decode(self.encode_literal(text)) == text

    def encode_raw_prompt(self, text: str) -> list[int]:
        """A developer's raw prompt (npc generate --raw): control tokens written in it are honoured,
        and BOS is prepended when the model's metadata asks for it."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def render_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise UserError("the model has no chat template (tokenizer.chat_template); use --raw")
        bos = self._tok.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self._tok.id_to_token(self.eos_ids[0]) if self.eos_ids else ""
        try:
            return _template(self.chat_template).render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos,
            )
        except TemplateError as e:
            raise UserError(f"chat template: {e}") from None

    def encode_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat, where only the template can produce control tokens.

        The rendered text is cut only at control tokens that the template itself wrote; the pieces
        between cuts (message contents included) are encoded literally. For contents with no special
        strings this gives exactly the ids a normal tokenizer gives for the rendered text.
        """
        ids: list[int] = []
        literal = ""  # text since the last control token
        for piece, is_content in self._chat_pieces(messages, add_generation_prompt):
            if is_content or self._special_pattern is None:
                literal += piece
                continue
            cursor = 0
            for m in self._special_pattern.finditer(piece):
                literal += piece[cursor:m.start()]
                if literal:
                    ids += self.encode_literal(literal)
                    literal = ""
                ids.append(self._tok.token_to_id(m.group()))
                cursor = m.end()
            literal += piece[cursor:]
        if literal:
            ids += self.encode_literal(literal)
        return ids

    def _chat_pieces(self, messages: Sequence[ChatMessage], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """The rendered chat as (text, is a message content) pieces, in order.

        The template is rendered a second time with a placeholder for each content: searching the
        real text for the contents instead can match the template's own text (a player line "<"
        matches the start of the template's next `<|im_end|>`, which would then pass as text).
        """
        text = self.render_chat(messages, add_generation_prompt)
        skeleton = self._skeleton(tuple(m.role for m in messages), add_generation_prompt)
        # Templates that trim contents (Llama 3's) show them stripped.
        for contents in ([m.content for m in messages], [m.content.strip() for m in messages]):
            pieces = [(contents[int(part)], True) if i % 2 else (part, False) for i, part in enumerate(skeleton)]
            if pieces and "".join(piece for piece, _ in pieces) == text:
                return pieces
        # A template that rewrites contents in other ways: find them in the text, in order.
        pieces, cursor = [], 0
        for start, end in _locate_contents(text, [m.content for m in messages]):
            pieces += [(text[cursor:start], False), (text[start:end], True)]
            cursor = end
        return [*pieces, (text[cursor:], False)]

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one tokenizer per process; the roles of a chat repeat)
    def _skeleton(self, roles: tuple[str, ...], add_generation_prompt: bool) -> list[str]:
        """The template rendered with a placeholder per content, split as [text, index, text, ...].

        It depends only on the roles (a template whose output depends on the contents fails the
        check in _chat_pieces and takes the search path), so one render serves every chat with
        these roles.
        """
        slots = [ChatMessage(role, f"\ue000{i}\ue001") for i, role in enumerate(roles)]
        try:
            return _SLOT.split(self.render_chat(slots, add_generation_prompt))
        except UserError:  # a template that refuses the placeholders
            return []

    def hf_json(self) -> str:
        """The tokenizer as a Hugging Face tokenizer.json (what grammar libraries build their vocabulary from)."""
        return self._tok.to_str()

    # --- decoding ---------------------------------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self.token_bytes)

    def _token_bytes(self) -> list[bytes]:
        """The bytes each token stands for; control tokens stand for nothing in generated text."""
        n = self.vocab_size
        table: list[bytes] = [b""] * n
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        for i in range(n):
            token = self._tok.id_to_token(i)
            if token is None or token in self.special_tokens:
                continue
            if self.kind == "byte_level":
                table[i] = bytes(byte_of[c] for c in token) if all(c in byte_of for c in token) else token.encode()
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                table[i] = bytes([int(token[3:5], 16)])
            else:
                table[i] = token.replace("▁", " ").encode()
        return table


class Detokenizer:
    """Token ids in, text out, one piece per token, never splitting a UTF-8 character."""

    def __init__(self, token_bytes: list[bytes]):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._token_bytes[token_id])

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _locate_contents(text: str, contents: list[str]) -> list[tuple[int, int]]:
    """Where each message content sits in the rendered text, searched in order."""
    spans, cursor = [], 0
    for content in contents:
        if not content:
            continue
        for candidate in (content, content.strip()):
            start = text.find(candidate, cursor) if candidate else -1
            if start >= 0:
                spans.append((start, start + len(candidate)))
                cursor = start + len(candidate)
                break
        else:
            raise UserError("the chat template rewrites message contents; cannot keep player text literal")
    return spans


# Placeholder contents (private-use characters, which no template writes) -> their message index.
_SLOT = re.compile("\ue000([0-9]+)\ue001")

_TEMPLATES: dict[str, object] = {}


def _template(source: str):
    if source not in _TEMPLATES:
        # The environment Hugging Face renders chat templates in, so templates behave the same.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
