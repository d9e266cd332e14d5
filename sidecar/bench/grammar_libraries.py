"""Which grammar-constrained decoding library for the turn grammar (issue 15), by measurement.

    OMP_NUM_THREADS=1 python -m sidecar.bench.grammar_libraries [--requests 14] [--out docs/bench/grammar_libraries.md]

The turn grammar (the reply the model writes):

    [EMOTION] one line of text
    @sell_item {"item": "iron sword", "price": 40}        <- 0 to 3 action lines
    @warn {"note": "bandits at the mill", "urgent": true, "mood": "loud"}
    @open_gate {}

with EMOTION one of 5 labels, `item` one of the request's 6 `stock` entities, `price` an integer in
1..1000, `note` a JSON string of at most 40 characters, `urgent` a boolean, `mood` a static enum, the
arguments exactly as `json.dumps` prints them (", " and ": ", keys in schema order, all required).

Each library gets the grammar in its own form: llguidance a Lark grammar whose arguments are `%json`
schemas; xgrammar hand-written EBNF, and the same with the arguments from its JSON-schema converter
glued in with Grammar.concat/union; outlines-core one regular expression (the grammar is regular: the
number of actions is bounded). All use our tokenizer (SmolLM2, 49152 tokens, EOS `<|im_end|>` = 2).

Measured, single-threaded unless said: one-time vocabulary setup; compile time of a new grammar (the
entity lists change with every request, so this is paid per request; the library's cache, where it
has one, on a repeat of the same grammar); per-token mask time (mean and p99) while following real
replies token by token, each request with a grammar of its own; 8 matchers' masks per step (the
library's parallel API where it has one, with 2 threads); cost of applying a bitmask to the logits
without torch.compile; and correctness: every token of every good reply allowed by the mask and
accepted, EOS allowed at the end only, each bad reply refused, and the masks compared with
llguidance's at every step.

xgrammar and outlines-core are optional: imported lazily, skipped with a message if not importable.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidecar.bench.report import machine_description, markdown_table, update_section

# ---------------------------------------------------------------------------------------------
# The turn grammar: one character's schema plus one request's entities.

EMOTIONS = ("gruff", "proud", "annoyed", "amused", "sad")
STOCK = ("iron sword", "steel axe", "hammer", "oak shield", "healing potion")  # + one per request


@dataclass(frozen=True)
class Arg:
    name: str
    type: str  # enum | integer | string | boolean
    values: tuple[str, ...] = ()
    values_from: str | None = None
    min: int = 0
    max: int = 0
    max_chars: int = 32


@dataclass(frozen=True)
class Action:
    name: str
    args: tuple[Arg, ...] = ()


ACTIONS = (
    Action("sell_item", (Arg("item", "enum", values_from="stock"), Arg("price", "integer", min=1, max=1000))),
    Action("warn", (Arg("note", "string", max_chars=40), Arg("urgent", "boolean"),
                    Arg("mood", "enum", values=("calm", "loud")))),
    Action("open_gate"),
)
MAX_ACTIONS = 3


def entities_for(request: int) -> dict[str, list[str]]:
    """Request `request`'s entity lists: 6 stock items, the last one new in every request, so no two
    requests share a grammar (as in the game, where the lists come with each request)."""
    return {"stock": [*STOCK, f"bundle of {request + 2} arrows"]}


def _enum_values(arg: Arg, entities: dict[str, list[str]]) -> list[str]:
    return list(entities[arg.values_from]) if arg.values_from else list(arg.values)


def _usable(action: Action, entities: dict[str, list[str]]) -> bool:
    return all(a.type != "enum" or _enum_values(a, entities) for a in action.args)


# --- llguidance: Lark with %json --------------------------------------------------------------

def arg_schema(arg: Arg, entities: dict[str, list[str]]) -> dict[str, Any]:
    if arg.type == "enum":
        return {"enum": _enum_values(arg, entities)}
    if arg.type == "integer":
        return {"type": "integer", "minimum": arg.min, "maximum": arg.max}
    if arg.type == "string":
        return {"type": "string", "maxLength": arg.max_chars}
    return {"type": "boolean"}


def action_schema(action: Action, entities: dict[str, list[str]]) -> dict[str, Any]:
    return {"type": "object", "properties": {a.name: arg_schema(a, entities) for a in action.args},
            "required": [a.name for a in action.args], "additionalProperties": False}


def lark_grammar(entities: dict[str, list[str]]) -> str:
    # x-guidance: json.dumps's separators, no free whitespace (llguidance's %json allows some by default),
    # and \uXXXX escapes of any character (json.dumps's ensure_ascii; by default only control characters)
    fmt = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False,
           "json_allow_general_unicode_escapes": True}
    alts = [f'"{a.name} " %json{json.dumps({**action_schema(a, entities), "x-guidance": fmt})}'
            for a in ACTIONS if _usable(a, entities)]
    emotions = " | ".join(json.dumps(e) for e in EMOTIONS)
    return "\n".join([
        'start: "[" EMOTION "] " TEXT actions',
        f"EMOTION: {emotions}",
        r"TEXT: /[^\n]+/",
        r'actions: ("\n@" action){0,' + str(MAX_ACTIONS) + "}",
        "action: " + "\n    | ".join(alts),
    ]) + "\n"


# --- xgrammar: EBNF (GBNF dialect) --------------------------------------------------------------

def _int_range_pieces(lo: int, hi: int) -> list[list[str]]:
    """Digit patterns (each a list of single-character classes) matching exactly the integers lo..hi,
    without leading zeros. Negative ranges by a "-" piece."""
    if lo < 0:
        negative = [["-", *p] for p in _int_range_pieces(1 if hi >= 0 else -hi, -lo)]
        return negative + (_int_range_pieces(0, hi) if hi >= 0 else [])
    pieces: list[list[str]] = []

    def same_len(a: str, b: str) -> list[list[str]]:
        if a == b:
            return [list(a)]
        if len(a) == 1:
            return [[f"[{a}-{b}]"]]
        if a[0] == b[0]:
            return [[a[0], *p] for p in same_len(a[1:], b[1:])]
        rest = len(a) - 1
        if a[1:] == "0" * rest and b[1:] == "9" * rest:
            return [[f"[{a[0]}-{b[0]}]", *["[0-9]"] * rest]]
        out = [[a[0], *p] for p in same_len(a[1:], "9" * rest)]
        if int(a[0]) + 1 <= int(b[0]) - 1:
            out.append([f"[{int(a[0]) + 1}-{int(b[0]) - 1}]", *["[0-9]"] * rest])
        out += [[b[0], *p] for p in same_len("0" * rest, b[1:])]
        return out

    for digits in range(len(str(lo)), len(str(hi)) + 1):
        a, b = max(lo, 10 ** (digits - 1) if digits > 1 else 0), min(hi, 10 ** digits - 1)
        if a <= b:
            pieces += same_len(str(a), str(b))
    return pieces


def _ebnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_EBNF_JSON_CHAR = r'json_char ::= [^"\\\x00-\x1f] | "\\" ["\\/bfnrt] | "\\u" [0-9a-fA-F]{4}'


def _ebnf_value(arg: Arg, entities: dict[str, list[str]]) -> str:
    if arg.type == "enum":
        return "(" + " | ".join(_ebnf_literal(json.dumps(v)) for v in _enum_values(arg, entities)) + ")"
    if arg.type == "integer":
        alts = [" ".join(c if c.startswith("[") else _ebnf_literal(c) for c in p)
                for p in _int_range_pieces(arg.min, arg.max)]
        return "(" + " | ".join(alts) + ")"
    if arg.type == "string":
        return '"\\"" json_char{0,' + str(arg.max_chars) + '} "\\""'
    return '("true" | "false")'


def ebnf_grammar(entities: dict[str, list[str]]) -> str:
    lines = [f"root ::= \"[\" emotion \"] \" text action{{0,{MAX_ACTIONS}}}",
             "emotion ::= " + " | ".join(_ebnf_literal(e) for e in EMOTIONS),
             r"text ::= [^\n]+"]
    alts = []
    for a in ACTIONS:
        if not _usable(a, entities):
            continue
        alts.append(f"args_{a.name}")
        parts = [_ebnf_literal(f"{a.name} {{" if a.args else f"{a.name} {{}}")]
        for i, arg in enumerate(a.args):
            parts += [_ebnf_literal((", " if i else "") + json.dumps(arg.name) + ": "), _ebnf_value(arg, entities)]
        if a.args:
            parts.append(_ebnf_literal("}"))
        lines.append(f"args_{a.name} ::= " + " ".join(parts))
    lines.insert(3, 'action ::= "\\n@" (' + " | ".join(alts) + ")")
    lines.append(_EBNF_JSON_CHAR)
    return "\n".join(lines) + "\n"


# --- outlines-core: one regex (Rust `regex` syntax) ----------------------------------------------

def _rx_literal(text: str) -> str:
    return "".join("\\" + c if c in ".+*?()|[]{}^$#&-~\\" else ("\\n" if c == "\n" else c) for c in text)


_RX_JSON_STRING_CHAR = r'(?:[^"\\\x00-\x1F]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'


def _rx_value(arg: Arg, entities: dict[str, list[str]]) -> str:
    if arg.type == "enum":
        return "(?:" + "|".join(_rx_literal(json.dumps(v)) for v in _enum_values(arg, entities)) + ")"
    if arg.type == "integer":
        return "(?:" + "|".join("".join(p) for p in _int_range_pieces(arg.min, arg.max)) + ")"
    if arg.type == "string":
        return '"' + _RX_JSON_STRING_CHAR + "{0," + str(arg.max_chars) + '}"'
    return "(?:true|false)"


def regex_grammar(entities: dict[str, list[str]]) -> str:
    alts = []
    for a in ACTIONS:
        if not _usable(a, entities):
            continue
        body = "".join(_rx_literal((", " if i else "") + json.dumps(arg.name) + ": ") + _rx_value(arg, entities)
                       for i, arg in enumerate(a.args))
        alts.append(_rx_literal(a.name + " {") + body + _rx_literal("}"))
    emotions = "|".join(_rx_literal(e) for e in EMOTIONS)
    return rf"\[(?:{emotions})\] [^\n]+(?:\n@(?:{'|'.join(alts)})){{0,{MAX_ACTIONS}}}"


# ---------------------------------------------------------------------------------------------
# Replies to follow (each must be accepted) and replies that must be refused.

GOOD_REPLIES = [
    '[gruff] Forty gold, lad.\n@sell_item {"item": "iron sword", "price": 40}',
    "[amused] Ha! You want to know about the old mill? Well, sit down then, because it is a long story, "
    "and my grandmother told it better than I ever could, but the short of it is that the miller's "
    "daughter ran off with a travelling tinker one spring and the wheel has not turned since.",
    '[proud] Finest axe in the valley, and the gate is yours.\n@sell_item {"item": "steel axe", "price": 1000}'
    "\n@open_gate {}",
    '[annoyed] Mind the road, traveller.\n@warn {"note": "bandits near the old mill", "urgent": true, '
    '"mood": "loud"}',
    '[sad] Take it all, I have no use for it now.\n@sell_item {"item": "healing potion", "price": 7}'
    '\n@warn {"note": "she would have wanted you to have it", "urgent": false, "mood": "calm"}\n@open_gate {}',
    "[amused] Ha! Café au lait — très bien, ami. ☕ Now, what'll it be?",
    # json.dumps escapes: \" and \u00e9 (ensure_ascii); 38 characters once decoded
    "[gruff] Careful out there.\n@warn " + json.dumps({"note": 'the "old" mill by the café', "urgent": False,
                                                      "mood": "calm"}),
]

# (name, text): the whole text is not in the language; it must be refused at some token or at EOS.
BAD_REPLIES = [
    ("item not in the request's stock", '[gruff] Hi\n@sell_item {"item": "gold bar", "price": 40}'),
    ("price 1001 > max", '[gruff] Hi\n@sell_item {"item": "hammer", "price": 1001}'),
    ("price 0 < min", '[gruff] Hi\n@sell_item {"item": "hammer", "price": 0}'),
    ("price with leading zero", '[gruff] Hi\n@sell_item {"item": "hammer", "price": 040}'),
    ("unknown emotion", "[happy] Hi there."),
    ("unknown action", "[gruff] Hi\n@dance {}"),
    ("4th action", "[gruff] Hi\n@open_gate {}\n@open_gate {}\n@open_gate {}\n@open_gate {}"),
    ("keys out of order", '[gruff] Hi\n@sell_item {"price": 40, "item": "hammer"}'),
    ("compact JSON separators", '[gruff] Hi\n@sell_item {"item":"hammer","price":40}'),
    ("missing argument", '[gruff] Hi\n@sell_item {"item": "hammer"}'),
    ("note of 41 chars", '[gruff] Hi\n@warn {"note": "' + "x" * 41 + '", "urgent": true, "mood": "calm"}'),
    ("raw tab inside a string", '[gruff] Hi\n@warn {"note": "a\tb", "urgent": true, "mood": "calm"}'),
    ("boolean as string", '[gruff] Hi\n@warn {"note": "x", "urgent": "yes", "mood": "calm"}'),
    ("empty text line", "[gruff] \n@open_gate {}"),
    ("second text line", "[gruff] Hi\nthere"),
    ("nothing after the emotion", "[gruff] "),
]

# ---------------------------------------------------------------------------------------------
# One adapter per library: the same few operations, the library's own API underneath.

TITLE = "Grammar-constrained decoding libraries, measured (issue 15)"

Mask = torch.Tensor  # int32 [rows, ceil(vocab/32)]: bit j of word i = token 32*i + j allowed


class Backend:
    name: str
    package: str
    grammar_form: str
    parallel_api: str = "none (loop)"
    cache_note: str = ""

    def setup(self, tok) -> None: ...
    def grammar_text(self, entities: dict[str, list[str]]) -> str: ...
    def compile(self, text: str, cached: bool = False) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, matcher: Any, mask: Mask, row: int) -> None: ...
    def consume(self, matcher: Any, token: int) -> bool: ...

    def fill_batch(self, matchers: list[Any], mask: Mask) -> None:
        for row, m in enumerate(matchers):
            self.fill(m, mask, row)


class LlguidanceBackend(Backend):
    name, package = "llguidance", "llguidance"
    grammar_form = "Lark, arguments as %json schemas (x-guidance separators)"
    parallel_api = "LLExecutor + fill_next_token_bitmask_par"
    cache_note = "no compile cache; a compiled matcher can be deep_copy()d"

    def setup(self, tok) -> None:
        import llguidance  # not llguidance.torch: its @torch.compile decorator imports dynamo (~2 s)
        self.ll = llguidance
        # From the tokenizer.json text: llguidance runs the HF tokenizer itself (canonical tokenization
        # of forced text). EOS ids given explicitly.
        self.tokenizer = llguidance.LLTokenizer(tok._tok.to_str(), eos_token=list(tok.eos_ids))
        self.executor = llguidance.LLExecutor(num_threads=2)
        self._templates: dict[str, Any] = {}

    def grammar_text(self, entities):
        return lark_grammar(entities)

    def compile(self, text, cached=False):
        if cached and text in self._templates:
            return self._templates[text].deep_copy()
        m = self.ll.LLMatcher(self.tokenizer, self.ll.LLMatcher.grammar_from_lark(text), log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        self._templates[text] = m.deep_copy()
        return m

    def matcher(self, compiled):
        return compiled  # LLMatcher is both

    def fill(self, matcher, mask, row):
        v = mask[row]
        matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * 4)

    def consume(self, matcher, token):
        return matcher.consume_token(token)

    def fill_batch(self, matchers, mask):  # = llguidance.torch.fill_next_token_bitmask_par
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], mask.data_ptr(),
                                              mask.shape[1] * 4, mask.shape[0])


class XgrammarBackend(Backend):
    name, package = "xgrammar (EBNF)", "xgrammar"
    grammar_form = "EBNF written by hand (JSON arguments spelled out)"
    parallel_api = "BatchGrammarMatcher(max_threads=2)"
    cache_note = "GrammarCompiler cache (keyed by grammar text)"

    def setup(self, tok) -> None:
        import xgrammar
        self.xgr = xgrammar
        # The bytes of each token, RAW: no guessing of the vocabulary's encoding. Control tokens
        # have no bytes, which xgrammar treats as special (never allowed); EOS is a stop token.
        self.info = xgrammar.TokenizerInfo(list(tok.token_bytes), xgrammar.VocabType.RAW,
                                           vocab_size=tok.vocab_size, stop_token_ids=list(tok.eos_ids))
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=2)

    def grammar_text(self, entities):
        return ebnf_grammar(entities)

    def compile(self, text, cached=False):
        return self.compiler.compile_grammar(text)  # the cache answers a repeat of the same text

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, mask, row):
        matcher.fill_next_token_bitmask(mask, row)

    def consume(self, matcher, token):
        return matcher.accept_token(token)

    def fill_batch(self, matchers, mask):
        self.batch.batch_fill_next_token_bitmask(matchers, mask)


class XgrammarSchemaBackend(XgrammarBackend):
    """The head in EBNF, each action's arguments from xgrammar's JSON-schema converter
    (separators fixed), glued with Grammar.concat / Grammar.union."""
    name = "xgrammar (JSON schema)"
    grammar_form = "EBNF head + Grammar.from_json_schema(separators=(', ', ': ')) via concat/union"

    def grammar_text(self, entities):
        return json.dumps(entities)  # the grammar is built from objects; its text is only a cache key

    def compile(self, text, cached=False):
        entities = json.loads(text)
        G = self.xgr.Grammar
        head = G.from_ebnf(f'root ::= "[" ({" | ".join(_ebnf_literal(e) for e in EMOTIONS)}) "] " [^\\n]+')
        alts = []
        for a in ACTIONS:
            if not _usable(a, entities):
                continue
            prefix = G.from_ebnf(f"root ::= {_ebnf_literal(chr(10) + '@' + a.name + ' ')}")
            args = G.from_json_schema(action_schema(a, entities), any_whitespace=False, separators=(", ", ": "))
            alts.append(G.concat(prefix, args))
        action = G.union(*alts)
        tails = [G.from_ebnf('root ::= ""')] + [G.concat(*[action] * n) for n in range(1, MAX_ACTIONS + 1)]
        return self.compiler.compile_grammar(G.concat(head, G.union(*tails)))


class OutlinesBackend(Backend):
    name, package = "outlines-core", "outlines_core"
    grammar_form = "one regex (the grammar is regular), anchored with a trailing `$`"
    cache_note = "no compile cache; an Index can be reused by any number of Guides"

    def setup(self, tok) -> None:
        import outlines_core
        self.oc = outlines_core
        eos = tok.eos_ids[0]  # Vocabulary takes exactly one EOS id
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(tok.token_bytes):
            if b and i not in tok.eos_ids:  # control tokens (no bytes) left out: never allowed
                by_bytes.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(eos, by_bytes)
        self._indexes: dict[str, Any] = {}

    def grammar_text(self, entities):
        # The trailing `$` works around an outlines-core 0.2.14 Index bug (see probe_alternatives): without
        # it the `\n` token that starts an action line is never allowed after the text line.
        return regex_grammar(entities) + "$"

    def compile(self, text, cached=False):
        if cached and text in self._indexes:
            return self._indexes[text]
        index = self.oc.Index(text, self.vocab)
        self._indexes[text] = index
        return index

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matcher, mask, row):
        v = mask[row]
        matcher.write_mask_into(v.data_ptr(), v.numel(), v.element_size())

    def consume(self, matcher, token):
        try:
            matcher.advance(token, return_tokens=False)
            return True
        except Exception:  # noqa: BLE001 - "No next state found ..."
            return False


BACKENDS: list[Callable[[], Backend]] = [LlguidanceBackend, XgrammarBackend, XgrammarSchemaBackend, OutlinesBackend]

# ---------------------------------------------------------------------------------------------
# Measurement


def allowed(mask: Mask, row: int, token: int) -> bool:
    return bool((int(mask[row, token >> 5]) >> (token & 31)) & 1)


def mask_tokens(mask: Mask, row: int, vocab: int) -> set[int]:
    bits = np.unpackbits(mask[row].numpy().view(np.uint8), bitorder="little")[:vocab]
    return set(np.flatnonzero(bits).tolist())


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


@dataclass
class Result:
    name: str
    version: str = ""
    form: str = ""
    error: str | None = None
    import_ms: float = 0.0
    setup_ms: float = 0.0
    compile_ms: list[float] = field(default_factory=list)
    first_mask_ms: list[float] = field(default_factory=list)
    cached_compile_ms: list[float] = field(default_factory=list)
    mask_us: list[float] = field(default_factory=list)
    consume_us: list[float] = field(default_factory=list)
    batch_par_us: list[float] = field(default_factory=list)
    batch_seq_us: list[float] = field(default_factory=list)
    good: list[dict[str, Any]] = field(default_factory=list)
    bad: list[dict[str, Any]] = field(default_factory=list)
    agree_steps: int = 0
    superset_steps: int = 0  # allows more than llguidance (e.g. non-canonical tokens of forced text)
    subset_steps: int = 0
    compared_steps: int = 0
    disagreements: list[str] = field(default_factory=list)
    parallel_api: str = ""
    cache_note: str = ""


def _fmt_tokens(tok, ids) -> str:
    return ", ".join(repr(tok.token_bytes[i].decode("utf-8", "replace")) if tok.token_bytes[i] else f"<{i}>"
                     for i in sorted(ids)[:4])


def follow(be: Backend, tok, matcher, ids: list[int], mask: Mask, res: Result | None,
           reference: list[set[int]] | None = None, record: list[set[int]] | None = None) -> dict[str, Any]:
    """Walks `ids` through `matcher`: fill the mask (timed), check the token, consume it (timed).
    Returns where it was refused (or None) and whether EOS was allowed at the end."""
    eos = tok.eos_ids[0]
    out: dict[str, Any] = {"refused_at": None, "refused_token": None, "eos_at_end": None, "eos_early": None}
    for step, t in enumerate(ids):
        t0 = time.perf_counter_ns()
        be.fill(matcher, mask, 0)
        t1 = time.perf_counter_ns()
        if res is not None:
            res.mask_us.append((t1 - t0) / 1e3)
        if record is not None or reference is not None:
            got = mask_tokens(mask, 0, tok.vocab_size)
            if record is not None:
                record.append(got)
            if reference is not None and step < len(reference) and res is not None:
                res.compared_steps += 1
                res.agree_steps += got == reference[step]
                res.superset_steps += got > reference[step]
                res.subset_steps += got < reference[step]
                superset = got > reference[step]
                kept = sum(d.startswith("(more)") == superset for d in res.disagreements)
                if got != reference[step] and kept < (2 if superset else 3):  # a few of each kind
                    ctx = tok.decode(ids[:step])[-24:]
                    more, fewer = got - reference[step], reference[step] - got
                    kind = "(more)" if superset else "(differs)"
                    res.disagreements.append(f"{kind} after {ctx!r}: only {be.name}: {len(more)} "
                                             f"[{_fmt_tokens(tok, more)}]; only llguidance: {len(fewer)} "
                                             f"[{_fmt_tokens(tok, fewer)}]")
        if step == 2:  # after "[emo" or so: EOS must not be allowed mid-reply
            out["eos_early"] = allowed(mask, 0, eos)
        if not allowed(mask, 0, t):
            out["refused_at"], out["refused_token"] = step, tok.token_bytes[t].decode("utf-8", "replace")
            return out
        t2 = time.perf_counter_ns()
        ok = be.consume(matcher, t)
        if res is not None:
            res.consume_us.append((time.perf_counter_ns() - t2) / 1e3)
        if not ok:
            out["refused_at"], out["refused_token"] = step, tok.token_bytes[t].decode("utf-8", "replace") + " (consume)"
            return out
    be.fill(matcher, mask, 0)
    if record is not None:
        record.append(mask_tokens(mask, 0, tok.vocab_size))
    if reference is not None and len(ids) < len(reference) and res is not None:
        got = mask_tokens(mask, 0, tok.vocab_size)
        res.compared_steps += 1
        res.agree_steps += got == reference[len(ids)]
        res.superset_steps += got > reference[len(ids)]
        res.subset_steps += got < reference[len(ids)]
    out["eos_at_end"] = allowed(mask, 0, eos)
    return out


def run_backend(make: Callable[[], Backend], tok, requests: int,
                reference: dict[int, list[set[int]]] | None) -> tuple[Result, dict[int, list[set[int]]]]:
    be = make()
    res = Result(be.name, form=be.grammar_form, parallel_api=be.parallel_api, cache_note=be.cache_note)
    try:
        t0 = time.perf_counter()
        importlib.import_module(be.package)
        res.import_ms = (time.perf_counter() - t0) * 1e3
        res.version = importlib.metadata.version(be.package.replace("_", "-"))
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        res.error = f"not importable: {type(e).__name__}: {e}"
        return res, {}
    masks_seen: dict[int, list[set[int]]] = {}
    try:
        t0 = time.perf_counter()
        be.setup(tok)
        res.setup_ms = (time.perf_counter() - t0) * 1e3
        mask = torch.full((1, (tok.vocab_size + 31) // 32), -1, dtype=torch.int32)

        # Warm-up on a grammar no measurement uses (first-call costs: thread pools, lazy imports).
        warm = be.matcher(be.compile(be.grammar_text(entities_for(10_000))))
        follow(be, tok, warm, tok.encode_literal(GOOD_REPLIES[0]), mask, None)

        # Compile per request; mask per token while following the replies, a grammar per request.
        for r in range(requests):
            reply = r % len(GOOD_REPLIES)
            text = be.grammar_text(entities_for(r))
            gc.collect()
            t0 = time.perf_counter()
            compiled = be.compile(text)
            m = be.matcher(compiled)
            t1 = time.perf_counter()
            be.fill(m, mask, 0)
            t2 = time.perf_counter()
            res.compile_ms.append((t1 - t0) * 1e3)
            res.first_mask_ms.append((t2 - t1) * 1e3)
            t0 = time.perf_counter()
            be.matcher(be.compile(text, cached=True))
            res.cached_compile_ms.append((time.perf_counter() - t0) * 1e3)
            m = be.matcher(compiled)
            ids = tok.encode_literal(GOOD_REPLIES[reply])
            record: list[set[int]] | None = [] if reference is None and r < len(GOOD_REPLIES) else None
            ref = reference.get(reply) if reference is not None and r < len(GOOD_REPLIES) else None
            out = follow(be, tok, m, ids, mask, res, reference=ref, record=record)
            if r < len(GOOD_REPLIES):
                res.good.append({"reply": reply, "tokens": len(ids), **out})
            if record is not None:
                masks_seen[reply] = record

        # Bad replies: each must be refused at a token or (complete text) by EOS not being allowed.
        for name, text in BAD_REPLIES:
            m = be.matcher(be.compile(be.grammar_text(entities_for(0)), cached=True))
            out = follow(be, tok, m, tok.encode_literal(text), mask, None)
            refused = out["refused_at"] is not None or not out["eos_at_end"]
            res.bad.append({"name": name, "refused": refused,
                            "where": (repr(out["refused_token"]) if out["refused_at"] is not None
                                      else "EOS" if refused else "accepted")})

        # A batch of 8 requests, each its own grammar and reply; rows leave when their reply ends.
        rows = 8
        bmask = torch.full((rows, (tok.vocab_size + 31) // 32), -1, dtype=torch.int32)
        for mode in ("par", "seq"):
            ms = [be.matcher(be.compile(be.grammar_text(entities_for(100 + i)), cached=True)) for i in range(rows)]
            replies = [tok.encode_literal(GOOD_REPLIES[i % len(GOOD_REPLIES)]) for i in range(rows)]
            live = list(range(rows))
            step = 0
            while live:
                t0 = time.perf_counter_ns()
                if mode == "par":
                    be.fill_batch([ms[i] for i in live], bmask)
                else:
                    Backend.fill_batch(be, [ms[i] for i in live], bmask)
                dt = (time.perf_counter_ns() - t0) / 1e3
                (res.batch_par_us if mode == "par" else res.batch_seq_us).append(dt)
                nxt = []
                for row, i in enumerate(live):
                    t = replies[i][step]
                    if allowed(bmask, row, t) and be.consume(ms[i], t) and step + 1 < len(replies[i]):
                        nxt.append(i)
                live = nxt
                step += 1
    except Exception as e:  # noqa: BLE001 - report what the library could not do, go on with the others
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return res, masks_seen


# --- applying a bitmask to logits, without torch.compile ------------------------------------------

_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_mask_torch(logits: torch.Tensor, mask: Mask) -> None:
    """Plain torch: unpack the 32 bits of each word, fill the disallowed logits with -inf."""
    bits = ((mask.unsqueeze(-1) >> _SHIFTS) & 1).view(mask.shape[0], -1)[:, : logits.shape[1]]
    logits.masked_fill_(bits == 0, float("-inf"))


_ADD = np.array([-np.inf, 0.0], dtype=np.float32)


def apply_mask_numpy(logits: torch.Tensor, mask: Mask) -> None:
    """numpy.unpackbits (bitorder little = the bitmask's layout), bits -> {-inf, 0}, one add_."""
    bits = np.unpackbits(mask.numpy().view(np.uint8), axis=-1, bitorder="little")[:, : logits.shape[1]]
    logits.add_(torch.from_numpy(_ADD[bits]))


def measure_apply(vocab: int) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    ways: dict[str, Callable[[torch.Tensor, Mask], None]] = {"torch shifts": apply_mask_torch,
                                                            "numpy unpackbits + add_": apply_mask_numpy}
    try:
        from xgrammar import apply_token_bitmask_inplace
        ways["xgrammar CPU kernel"] = apply_token_bitmask_inplace
    except Exception:  # noqa: BLE001 - optional
        pass
    gen = torch.Generator().manual_seed(0)
    for name, fn in ways.items():
        out[name] = {}
        for rows in (1, 8):
            mask = torch.randint(-2 ** 31, 2 ** 31 - 1, (rows, (vocab + 31) // 32), dtype=torch.int32, generator=gen)
            base = torch.randn(rows, vocab, generator=gen)
            ref = base.clone()
            apply_mask_torch(ref, mask)
            got = base.clone()
            fn(got, mask)
            assert torch.equal(torch.isinf(got), torch.isinf(ref)), name
            times = []
            for _ in range(200):
                logits = base.clone()
                t0 = time.perf_counter_ns()
                fn(logits, mask)
                times.append((time.perf_counter_ns() - t0) / 1e3)
            out[name][rows] = statistics.median(times)
    return out


# --- expressibility probes: other ways each library offers, checked on the bad replies --------------

def _probe_failed(label: str, e: Exception) -> str:
    if isinstance(e, ImportError):
        return f"{label} probe skipped: {e}"
    return f"{label} probe failed: {type(e).__name__}: {e}"


def probe_alternatives(tok) -> list[str]:
    notes = []
    ent = entities_for(0)
    sell = next(a for a in ACTIONS if a.name == "sell_item")
    try:
        import xgrammar as xgr
        info = xgr.TokenizerInfo(list(tok.token_bytes), xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                 stop_token_ids=list(tok.eos_ids))
        comp = xgr.GrammarCompiler(info, max_threads=1)
        lark = ('start: "[gruff] " /[^\\n]+/ ("\\n@sell_item " %json'
                + json.dumps(action_schema(sell, ent)) + ")?\n")
        cg = comp.compile_lark(lark)
        m = xgr.GrammarMatcher(cg)
        compact = m.accept_string('[gruff] Hi\n@sell_item {"item":"hammer","price":40}') and m.is_completed()
        notes.append("xgrammar `compile_lark` with `%json`: compiles; the JSON's whitespace is free (compact "
                     f"`{{\"item\":\"hammer\",\"price\":40}}` accepted: {compact}; no way found to fix the "
                     "separators), so json.dumps's exact form needs EBNF or from_json_schema(separators=...).")
    except Exception as e:  # noqa: BLE001
        notes.append(_probe_failed("xgrammar Lark %json", e))
    try:
        import xgrammar as xgr
        info = xgr.TokenizerInfo(list(tok.token_bytes), xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                 stop_token_ids=list(tok.eos_ids))
        comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        head = r'root ::= "[gruff] Hi\n@warn {\"note\": \"" '
        char = r'c ::= [^"\\\x00-\x1f] | "\\" ["\\/bfnrt] | "\\u" [0-9a-fA-F]{4}'
        chain = "\n".join([f's{i} ::= "" | c s{i + 1}' for i in range(40)] + ['s40 ::= ""'])
        forms = {"json_char{0,40} (exact)": head + 'c{0,40} "\\"}"\n' + char,
                 "plain_char{0,40} (no escapes)": head + r'[^"\\\x00-\x1f]{0,40} "\"}"',
                 "40 chained rules (exact)": head + 's0 "\\"}"\n' + char + "\n" + chain}
        ids = tok.encode_literal('[gruff] Hi\n@warn {"note": "bandits near the old mill"}')
        inside = len(tok.encode_literal('[gruff] Hi\n@warn {"note": "'))
        mask = torch.full((1, (tok.vocab_size + 31) // 32), -1, dtype=torch.int32)
        parts = []
        for label, ebnf in forms.items():
            t0 = time.perf_counter()
            cg = comp.compile_grammar(ebnf)
            compile_ms = (time.perf_counter() - t0) * 1e3
            m = xgr.GrammarMatcher(cg)
            times = []
            for k, t in enumerate(ids):
                t0 = time.perf_counter_ns()
                m.fill_next_token_bitmask(mask)
                if k >= inside:
                    times.append((time.perf_counter_ns() - t0) / 1e3)
                m.accept_token(t)
            parts.append(f"{label}: compile {compile_ms:.0f} ms, mask {statistics.fmean(times):.0f} µs/token")
        notes.append("xgrammar, a JSON string of at most 40 characters, mask time inside the string: "
                     + "; ".join(parts) + ". (Its JSON-schema converter writes maxLength as the no-escape form.)")
    except Exception as e:  # noqa: BLE001
        notes.append(_probe_failed("xgrammar string-bound", e))
    try:
        import re

        from outlines_core.json_schema import build_regex_from_schema
        rx = build_regex_from_schema(json.dumps(action_schema(sell, ent)), None)
        loose = re.fullmatch(rx, '{"item": "hammer", "price": 1001}') is not None
        notes.append("outlines-core `build_regex_from_schema`: integer minimum/maximum ignored "
                     f"(price 1001 matches: {loose}); whitespace optional around separators; so the "
                     "arguments are written into the regex by hand here.")
    except Exception as e:  # noqa: BLE001
        notes.append(_probe_failed("outlines-core schema", e))
    try:
        import outlines_core as oc
        by: dict[bytes, list[int]] = {}
        for i, b in enumerate(tok.token_bytes):
            if b and i not in tok.eos_ids:
                by.setdefault(b, []).append(i)
        voc = oc.Vocabulary(tok.eos_ids[0], by)
        g = oc.Guide(oc.Index(r"ab(\nc)?", voc))
        for t in tok.encode_literal("ab"):
            g.advance(t, return_tokens=False)
        nl = tok.encode_literal("\n")[0]
        g2 = oc.Guide(oc.Index(r"ab(\nc)?$", voc))
        for t in tok.encode_literal("ab"):
            g2.advance(t, return_tokens=False)
        eos_ok = True
        try:
            g3 = oc.Guide(oc.Index(r"ab", voc))
            for t in tok.encode_literal("ab"):
                g3.advance(t, return_tokens=False)
            eos_listed = tok.eos_ids[0] in g3.get_tokens()
            g3.advance(tok.eos_ids[0], return_tokens=False)
        except Exception:  # noqa: BLE001
            eos_ok = False
        notes.append(f"outlines-core EOS: listed as allowed in a final state: {eos_listed}; Guide.advance(EOS) "
                     f"there succeeds: {eos_ok} (outlines-core issue #227): stop on EOS without advancing. "
                     "Vocabulary takes one EOS id only.")
        notes.append(
            "outlines-core 0.2.14 Index bug: from an accepting DFA state, a token that ends one byte after the "
            "accepting position without completing a match is dropped (it tests `!dfa.is_match_state(next)`, and "
            "regex-automata reports matches one byte late). Regex `ab(\\nc)?` after `ab`: the `\\n` token allowed: "
            f"{nl in g.get_tokens()}; anchored, `ab(\\nc)?$`: {nl in g2.get_tokens()}. In the turn grammar, "
            "unanchored, it refuses the `\\n` before every action line (the text line is accepting) and "
            "single-byte pieces of multi-byte characters, so no reply can carry an action; a trailing `$` "
            "(matches only at the end of input) avoids it, and the measurements above use it. Fixed on "
            "outlines-core main (commit 2ba0b24, 'fix: avoid generating incomplete automata'), in no release.")
    except Exception as e:  # noqa: BLE001
        notes.append(_probe_failed("outlines-core newline", e))
    return notes


# ---------------------------------------------------------------------------------------------
# Report


def _ms(v: list[float]) -> str:
    return f"{statistics.median(v):.2f}" if v else "-"


def _us(v: list[float], q: float | None = None) -> str:
    if not v:
        return "-"
    return f"{(statistics.fmean(v) if q is None else pct(v, q)):.0f}"


def summary_rows(results: list[Result]) -> tuple[list[str], list[list[Any]]]:
    header = ["library", "version", "import ms", "vocab setup ms", "compile ms (new grammar)", "first mask ms",
              "compile ms (cached)", "mask µs mean", "mask µs p99", "consume µs mean",
              "batch 8 µs/step mean (p99), parallel API", "batch 8 µs/step mean (p99), loop",
              "good replies followed", "bad refused", "mask steps vs llguidance's"]
    rows = []
    for r in results:
        if r.error and not r.mask_us:
            rows.append([r.name, r.version or "-", f"skipped: {r.error}", *["-"] * (len(header) - 3)])
            continue
        good_ok = sum(1 for g in r.good if g["refused_at"] is None and g["eos_at_end"] and not g["eos_early"])
        bad_ok = sum(1 for b in r.bad if b["refused"])
        agree = (f"{r.agree_steps} same, {r.superset_steps} more, {r.subset_steps} fewer, "
                 f"{r.compared_steps - r.agree_steps - r.superset_steps - r.subset_steps} other / {r.compared_steps}"
                 if r.compared_steps else "(reference)")
        rows.append([
            r.name, r.version, f"{r.import_ms:.0f}", f"{r.setup_ms:.0f}",
            _ms(r.compile_ms), _ms(r.first_mask_ms), _ms(r.cached_compile_ms),
            _us(r.mask_us), _us(r.mask_us, 99), _us(r.consume_us),
            f"{_us(r.batch_par_us)} ({_us(r.batch_par_us, 99)})" if r.parallel_api != "none (loop)" else "-",
            f"{_us(r.batch_seq_us)} ({_us(r.batch_seq_us, 99)})",
            f"{good_ok}/{len(r.good)}", f"{bad_ok}/{len(r.bad)}", agree])
    return header, rows


def render(results: list[Result], apply: dict[str, dict[int, float]], notes: list[str], machine: dict[str, Any],
           command: str, requests: int) -> str:
    header, rows = summary_rows(results)
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores (shared), torch {machine['torch']}, "
        f"Python {machine['python']}, {machine['date']}. Command: `{command}`.",
        "",
        "Versions: " + ", ".join(f"{r.name.split(' ')[0]} {r.version}" for r in results
                                 if r.version and "JSON schema" not in r.name) + ".",
        "",
        "Grammar: `[EMOTION] text`, then 0-3 lines `@sell_item {\"item\": <one of 6 stock entities>, \"price\": "
        "<1..1000>}` / `@warn {\"note\": <string <= 40 chars>, \"urgent\": <bool>, \"mood\": \"calm\"|\"loud\"}` / "
        "`@open_gate {}`, arguments exactly as json.dumps prints them; tokenizer SmolLM2 (49152 tokens, EOS 2).",
        f"Each of {requests} requests compiles a grammar of its own (its stock list differs) and follows one of "
        f"{len(GOOD_REPLIES)} replies token by token; single-threaded (OMP_NUM_THREADS=1, compile threads 1) "
        "except the parallel batch API (2 threads). Times are medians (ms) or means / p99 over all steps (µs).",
        "",
        markdown_table(header, rows),
        "",
        "How each library got the grammar and its vocabulary:",
        "",
    ]
    for r in results:
        lines.append(f"- **{r.name}**: {r.form}. Batch: {r.parallel_api}. Cache: {r.cache_note}."
                     + (f" Error: {r.error}" if r.error else ""))
    lines += ["", "Per reply (tokens; where refused, EOS allowed at the end / mid-reply):", ""]
    reply_header = ["library"] + [f"reply {i} ({len(GOOD_REPLIES[i])} chars)" for i in range(len(GOOD_REPLIES))]
    reply_rows = []
    for r in results:
        if not r.good:
            continue
        cells = {}
        for g in r.good:
            where = ("all accepted" if g["refused_at"] is None
                     else f"refused token {g['refused_at']} {g['refused_token']!r}")
            cells[g["reply"]] = f"{g['tokens']} tok: {where}; EOS end {g['eos_at_end']}, early {g['eos_early']}"
        reply_rows.append([r.name] + [cells.get(i, "-") for i in range(len(GOOD_REPLIES))])
    lines += [markdown_table(reply_header, reply_rows), "", "Bad replies (where each was refused):", ""]
    bad_rows = []
    for i, (name, _) in enumerate(BAD_REPLIES):
        bad_rows.append([name] + [r.bad[i]["where"] if i < len(r.bad) else "-" for r in results if r.bad])
    lines += [markdown_table(["bad reply"] + [r.name for r in results if r.bad], bad_rows), ""]
    dis = [(r.name, d) for r in results for d in r.disagreements]
    if dis:
        lines += ["Mask differences from llguidance (first few):", ""] + [f"- {n}: {d}" for n, d in dis] + [""]
    lines += ["Applying a bitmask to fp32 logits [rows, 49152] without torch.compile (median µs):", ""]
    apply_rows = [[k, f"{v[1]:.0f}", f"{v[8]:.0f}"] for k, v in apply.items()]
    lines += [markdown_table(["method", "1 row", "8 rows"], apply_rows),
              "", "Expressibility probes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=14, help="grammars compiled and replies followed per library")
    p.add_argument("--out", type=Path, default=Path("docs/bench/grammar_libraries.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from sidecar.config import embedded_model_path
    from sidecar.engine.tokenizer import Tokenizer
    from sidecar.model.checkpoint import load_checkpoint
    tok = Tokenizer(load_checkpoint(embedded_model_path()))

    results: list[Result] = []
    reference: dict[int, list[set[int]]] | None = None
    for make in BACKENDS:
        res, seen = run_backend(make, tok, args.requests, reference)
        if reference is None and seen and not res.error:
            reference = seen  # llguidance's masks: the others are compared with them
        if res.error and not res.mask_us:
            print(f"{res.name}: skipped ({res.error})", file=sys.stderr)
        results.append(res)
    apply = measure_apply(tok.vocab_size)
    notes = probe_alternatives(tok)
    command = "OMP_NUM_THREADS=1 python -m sidecar.bench.grammar_libraries" + (
        f" --requests {args.requests}" if args.requests != 14 else "")
    text = render(results, apply, notes, machine_description(), command, args.requests)
    header, rows = summary_rows(results)
    print(markdown_table(header, rows))
    print()
    print(text[text.index("How each library"):])
    if not args.no_write:
        # Only the generated section is replaced: the recommendation written around it stays.
        update_section(args.out, "grammar_libraries", text, TITLE)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
