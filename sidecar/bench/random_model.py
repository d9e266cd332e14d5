"""Random-weight Llama checkpoints of a real model's shape, written as Hugging Face folders.

No weights can be downloaded on the benchmark machines, and speed does not depend on what the
weights are, only on their shape. So `npc bench --model-shape llama-3.2-1b` writes a folder with
Llama-3.2-1B's exact config.json, random bf16 weights (seeded, scaled so activations stay in a sane
range) and a Llama-3-style byte-level BPE tokenizer covering every one of its token ids, so that
any id a random model generates decodes. Both our loader and transformers load the folder.

The tokenizer's vocabulary holds the 256 byte tokens, the words of the benchmark's own prompts
(so a persona tokenizes to about as many tokens as with the real Llama 3 tokenizer), the numbers
0-999, then synthesized byte pairs and triples up to the vocabulary size, with Llama 3's special
tokens (`<|begin_of_text|>`, `<|eot_id|>`, ...) at the top ids.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sidecar.model.config import LlamaConfig

FORMAT_VERSION = 1  # bump when the files written change, so old cached folders are rewritten
STAMP = "random_model.json"  # written last: a folder without it is incomplete and gets rewritten
_CHUNK = 1 << 23  # values per random chunk (each chunk has its own generator: parallel and deterministic)

LLAMA3_ROPE_SCALING = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}
# Llama 3.2's special tokens at ids vocab_size - num_special ...; the rest are reserved tokens.
_SPECIAL_HEAD = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
# Llama 3's chat format (without 3.2's date and tool preamble): what the benchmark prompts need.
CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
# Llama 3's pre-tokenizer split (the same pattern as sidecar/engine/tokenizer.py's llama-bpe).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family model's hyper-parameters (`config`), with what its files add: the tokenizer's
    special tokens and config.json's RoPE scaling entry (written as Llama 3 states it)."""

    name: str
    config: LlamaConfig
    num_special: int = 256  # special tokens at the top ids (Llama 3: 128000-128255)
    rope_scaling: dict = field(default_factory=lambda: dict(LLAMA3_ROPE_SCALING))

    def config_json(self) -> dict:
        c = self.config
        special = c.vocab_size - self.num_special
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
            "attention_dropout": 0.0, "mlp_bias": False, "hidden_act": "silu", "initializer_range": 0.02,
            "bos_token_id": special, "eos_token_id": [special + 1, special + 8, special + 9],
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "max_position_embeddings": c.max_position,
            "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta, "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": c.tie_embeddings, "pretraining_tp": 1, "torch_dtype": "bfloat16",
            "use_cache": True,
        }

    def summary(self) -> dict:
        """What a benchmark report records about the shape (JSON-ready)."""
        return {"name": self.name, **asdict(self.config), "rope_scaling": self.rope_scaling,
                "parameters": self.parameters()}

    def parameters(self) -> int:
        c = self.config
        layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                 + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
                 + 2 * c.hidden_size)
        embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_embeddings else 2)
        return embeddings + c.num_layers * layer + c.hidden_size


def _llama3(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
            head_dim: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_eps=1e-5,
                       rope_theta=500000.0, max_position=131072, tie_embeddings=True)


SHAPES = {
    # meta-llama/Llama-3.2-1B(-Instruct)'s config.json.
    "llama-3.2-1b": ModelShape("llama-3.2-1b", _llama3(128256, 2048, 8192, 16, 32, 8, 64)),
    # The same architecture (GQA, llama3 RoPE scaling, tied embeddings) small enough for CPU tests.
    "tiny": ModelShape("tiny", _llama3(1024, 64, 128, 2, 4, 2, 16), num_special=16),
}


def get_shape(name: str) -> ModelShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; choose from {', '.join(SHAPES)}") from None


# --- tokenizer -----------------------------------------------------------------------------------


def special_tokens(shape: ModelShape) -> list[str]:
    """The special tokens in id order, starting at vocab_size - num_special."""
    if shape.num_special < len(_SPECIAL_HEAD):
        raise ValueError(f"num_special must be at least {len(_SPECIAL_HEAD)}")
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + shape.num_special - len(_SPECIAL_HEAD))]
    return _SPECIAL_HEAD + reserved


def _seed_words(pre_tokenizer) -> list[str]:
    """The pre-tokenized pieces of the benchmark prompts (byte-level spelled), most frequent first."""
    from sidecar.bench.workload import PLAYER_LINES, ROLES, persona

    texts = [persona(i) for i in range(len(ROLES))] + PLAYER_LINES + ["system", "user", "assistant",
                                                                      "Who are you?", "And what do you do here?"]
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    return [w for w, _ in counts.most_common()]


def build_tokenizer(shape: ModelShape):
    """A `tokenizers.Tokenizer` with exactly `shape.config.vocab_size` ids, every one decodable."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from sidecar.engine.tokenizer import bytes_to_unicode

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    n_bpe = shape.config.vocab_size - shape.num_special
    spelled = bytes_to_unicode()
    common = [spelled[b] for b in b" etaoinshrdlucmfwypvbgkjqxzETAOINSHRDLUCMFWYPVBGKJQXZ.,'0123456789\n"]
    order = list(dict.fromkeys(common + [spelled[b] for b in range(256)]))  # every byte, common ones first
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> bool:
        if token in vocab or len(vocab) >= n_bpe:
            return False
        vocab[token] = len(vocab)
        return True

    for ch in (spelled[b] for b in range(256)):
        add(ch)
    if len(vocab) < 256:
        raise ValueError(f"vocab_size {shape.config.vocab_size} leaves no room for the 256 byte tokens")
    for word in _seed_words(pre) + [str(n) for n in range(1000)]:
        add(word)  # matched whole (ignore_merges, as in Llama 3), so no merges are needed for them
    pairs = []  # every byte pair, those of common bytes first
    for k, b in enumerate(order):
        pairs += [(order[i], b) for i in range(k + 1)] + [(b, order[i]) for i in range(k)]
    for a, b in pairs:
        if len(vocab) >= n_bpe:
            break
        if add(a + b):
            merges.append((a, b))
    for c in order:
        for a, b in pairs:
            if len(vocab) >= n_bpe:
                break
            if add(a + b + c):
                merges.append((a + b, c))
    if len(vocab) < n_bpe:
        raise ValueError(f"could not synthesize {n_bpe} tokens")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens(shape)
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    bos = specials[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, n_bpe)]),
    ])
    assert tok.get_vocab_size(with_added_tokens=True) == shape.config.vocab_size
    return tok


def _write_tokenizer(folder: Path, shape: ModelShape) -> None:
    tok = build_tokenizer(shape)
    tok.save(str(folder / "tokenizer.json"))
    specials = special_tokens(shape)
    first = shape.config.vocab_size - shape.num_special
    tokens = {"bos_token": specials[0], "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **tokens, "chat_template": CHAT_TEMPLATE,
        "model_max_length": shape.config.max_position, "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
    }, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": first, "eos_token_id": [first + 1, first + 8, first + 9], "do_sample": False,
    }, indent=2) + "\n")


# --- weights ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    shape: tuple[int, ...]
    std: float  # 0: a norm weight (all ones)


def tensor_specs(shape: ModelShape, std: float = 0.02) -> list[_TensorSpec]:
    """Every tensor of the checkpoint, in file order, with the Hugging Face names."""
    c = shape.config
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    specs = [_TensorSpec("model.embed_tokens.weight", (c.vocab_size, h), std)]
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        specs += [
            _TensorSpec(f"{p}.input_layernorm.weight", (h,), 0.0),
            _TensorSpec(f"{p}.self_attn.q_proj.weight", (q, h), std),
            _TensorSpec(f"{p}.self_attn.k_proj.weight", (kv, h), std),
            _TensorSpec(f"{p}.self_attn.v_proj.weight", (kv, h), std),
            _TensorSpec(f"{p}.self_attn.o_proj.weight", (h, q), std),
            _TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), 0.0),
            _TensorSpec(f"{p}.mlp.gate_proj.weight", (c.intermediate_size, h), std),
            _TensorSpec(f"{p}.mlp.up_proj.weight", (c.intermediate_size, h), std),
            _TensorSpec(f"{p}.mlp.down_proj.weight", (h, c.intermediate_size), std),
        ]
    specs.append(_TensorSpec("model.norm.weight", (h,), 0.0))
    if not c.tie_embeddings:
        specs.append(_TensorSpec("lm_head.weight", (c.vocab_size, h), std))
    return specs


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _chunk(seed: int, index: int, spec: _TensorSpec, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """Rows `rows` of tensor number `index`: normal * std from their own generator (order-independent)."""
    shape = (rows.stop - rows.start, *spec.shape[1:])
    if spec.std == 0.0:
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index * 65_537 + rows.start)
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(spec.std).to(dtype)


def _row_slices(spec: _TensorSpec) -> list[slice]:
    rows = spec.shape[0]
    per_row = _numel(spec.shape[1:])
    step = max(1, _CHUNK // per_row) if len(spec.shape) > 1 else rows
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def _write_safetensors(path: Path, specs: list[_TensorSpec], seed: int, dtype: torch.dtype, progress: bool) -> None:
    """One safetensors file written tensor by tensor: the header first (every shape is known), then
    each tensor's bytes as its chunks are generated, so memory stays at a few chunks, not the model."""
    st_dtype = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    itemsize = torch.tensor([], dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        size = _numel(s.shape) * itemsize
        header[s.name] = {"dtype": st_dtype, "shape": list(s.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
    workers = min(16, os.cpu_count() or 1)
    bar = tqdm(total=offset, unit="B", unit_scale=True, desc=f"writing {path.name}", disable=not progress)
    with open(path, "wb") as f, ThreadPoolExecutor(workers) as pool:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        jobs = [(i, s, r) for i, s in enumerate(specs) for r in _row_slices(s)]
        # A window of chunks in flight: parallel generation, bounded memory, written in file order.
        window = workers * 2
        futures = [pool.submit(_chunk, seed, i, s, r, dtype) for i, s, r in jobs[:window]]
        for k in range(len(jobs)):
            t = futures[k].result()
            futures[k] = None  # type: ignore[call-overload]
            if k + window < len(jobs):
                i, s, r = jobs[k + window]
                futures.append(pool.submit(_chunk, seed, i, s, r, dtype))
            f.write(t.contiguous().view(torch.uint8).numpy())
            bar.update(t.numel() * itemsize)
    bar.close()


# --- the folder ------------------------------------------------------------------------------------


def write_random_model(folder: Path, shape: ModelShape | str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       progress: bool = True) -> Path:
    """Writes config.json, model.safetensors, the tokenizer files and generation_config.json."""
    shape = get_shape(shape) if isinstance(shape, str) else shape
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = shape.config_json()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tokenizer(folder, shape)
    _write_safetensors(folder / "model.safetensors", tensor_specs(shape), seed, dtype, progress)
    (folder / STAMP).write_text(json.dumps(_stamp(shape, seed, dtype), indent=2) + "\n")
    return folder


def _stamp(shape: ModelShape, seed: int, dtype: torch.dtype) -> dict:
    return {"format_version": FORMAT_VERSION, "shape": asdict(shape), "seed": seed, "dtype": str(dtype),
            "note": "random weights (sidecar/bench/random_model.py): for speed measurements only"}


def ensure_random_model(root: Path, shape: ModelShape | str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                        progress: bool = True) -> Path:
    """root/<shape name>, written unless a complete folder of the same shape, seed and dtype is there."""
    shape = get_shape(shape) if isinstance(shape, str) else shape
    folder = Path(root) / shape.name
    try:
        if json.loads((folder / STAMP).read_text()) == _stamp(shape, seed, dtype):
            return folder
    except (OSError, ValueError):
        pass
    return write_random_model(folder, shape, seed, dtype, progress)


def main() -> None:
    p = argparse.ArgumentParser(description="write a random-weight Llama folder of a named shape")
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(write_random_model(Path(a.out), a.shape, a.seed))


if __name__ == "__main__":
    main()
