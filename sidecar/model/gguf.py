"""GGUF -> Checkpoint: model config from metadata, tensors in Hugging Face layout, tokenizer vocab.

Quantized tensors stay as raw GGML blocks (see checkpoint.SourceTensor); only their row order
changes, to undo the q/k permutation llama.cpp applies to "llama" files for its RoPE kernel ("qwen2"
files keep the rotate-half layout and are stored as they are). After that the weights are in the
Hugging Face layout, so PEFT adapters trained on HF models apply unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader

from sidecar.errors import ModelFileError
from sidecar.model.checkpoint import (
    SUPPORTED_KINDS,
    Checkpoint,
    SourceTensor,
    unpermute_rows,
    validate,
)
from sidecar.model.config import LlamaConfig, RopeScaling
from sidecar.model.vocab import GgufVocab

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_PERMUTED_QK = ("llama",)  # llama.cpp's converter interleaves q/k rows for these (its "norm" RoPE)

_GLOBAL_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "norm", "output.weight": "head"}
_LAYER_NAMES = {
    "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
    "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm",
}
_LAYER_BIASES = {"attn_q": "q_bias", "attn_k": "k_bias", "attn_v": "v_bias"}


def _open(path: Path) -> GGUFReader:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(path, f"cannot read: {e.strerror}") from None
    if magic != b"GGUF":
        raise ModelFileError(path, "not a GGUF file (bad magic bytes)")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises many types on damaged files
        raise ModelFileError(path, f"truncated or corrupt GGUF ({type(e).__name__}: {e})") from None


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _required(reader: GGUFReader, path: Path, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ModelFileError(path, f"missing metadata {key!r}")
    return value


def _rope_scaling(reader: GGUFReader, path: Path, arch: str, tensors: dict[str, Any]) -> RopeScaling | None:
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: llama.cpp precomputes per-frequency divisors
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32).reshape(-1)
        return RopeScaling("freq_factors", freq_factors=tuple(float(x) for x in factors))
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    if kind == "linear":
        return RopeScaling("linear", factor=float(_field(reader, f"{arch}.rope.scaling.factor", 1.0)))
    raise ModelFileError(path, f"unsupported rope scaling type {kind!r} ({arch}.rope.scaling.type)")


def _config(reader: GGUFReader, path: Path, arch: str, tensors: dict[str, Any], vocab_size: int) -> LlamaConfig:
    p = f"{arch}."
    heads = int(_required(reader, path, p + "attention.head_count"))
    hidden = int(_required(reader, path, p + "embedding_length"))
    try:
        return LlamaConfig(
            vocab_size=int(_field(reader, p + "vocab_size", vocab_size)),
            hidden_size=hidden,
            intermediate_size=int(_required(reader, path, p + "feed_forward_length")),
            num_layers=int(_required(reader, path, p + "block_count")),
            num_heads=heads,
            num_kv_heads=int(_field(reader, p + "attention.head_count_kv", heads)),
            head_dim=int(_field(reader, p + "attention.key_length", 0) or _field(reader, p + "rope.dimension_count", 0)
                         or hidden // heads),
            rms_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
            max_position=_context(reader, p),
            tie_embeddings="output.weight" not in tensors,
            rope_scaling=_rope_scaling(reader, path, arch, tensors),
            qkv_bias="blk.0.attn_q.bias" in tensors,
            architecture=arch,
        )
    except ValueError as e:
        raise ModelFileError(path, f"inconsistent metadata: {e}") from None


def _context(reader: GGUFReader, p: str) -> int:
    """The context served: a declared sliding window caps it, so attention never needs the window (exact)."""
    context = int(_field(reader, p + "context_length", 4096))
    window = int(_field(reader, p + "attention.sliding_window", 0) or 0)
    return min(context, window) if window > 0 else context


def _vocab(reader: GGUFReader, path: Path) -> GgufVocab:
    return GgufVocab(
        model=str(_required(reader, path, "tokenizer.ggml.model")),
        pre=str(_field(reader, "tokenizer.ggml.pre", "default")),
        tokens=list(_required(reader, path, "tokenizer.ggml.tokens")),
        token_types=list(_field(reader, "tokenizer.ggml.token_type", [])),
        merges=list(_field(reader, "tokenizer.ggml.merges", [])),
        scores=list(_field(reader, "tokenizer.ggml.scores", [])),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )


def _canonical_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk":
        return None
    names = {"weight": _LAYER_NAMES, "bias": _LAYER_BIASES}.get(parts[3], {})
    return f"layers.{int(parts[1])}.{names[parts[2]]}" if parts[2] in names else None


def load_gguf(path: Path) -> Checkpoint:
    reader = _open(path)
    arch = str(_field(reader, "general.architecture", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ModelFileError(path, f"unsupported architecture {arch!r} (supported: {supported})")

    by_gguf_name = {t.name: t for t in reader.tensors}
    vocab = _vocab(reader, path)
    config = _config(reader, path, arch, by_gguf_name, len(vocab.tokens))

    tensors: dict[str, SourceTensor] = {}
    for t in reader.tensors:
        canonical = _canonical_name(t.name)
        if canonical is None:
            continue  # rope_freqs is folded into the config; anything else is not used by the forward
        kind = t.tensor_type.name
        if kind not in SUPPORTED_KINDS:
            raise ModelFileError(path, f"tensor {t.name!r} has unsupported type {kind} "
                                       f"(supported: {', '.join(SUPPORTED_KINDS)})")
        shape = tuple(int(d) for d in reversed(t.shape))
        tensors[canonical] = SourceTensor(t.name, kind, shape, t.data)

    validate(path, config, tensors)
    # Undo llama.cpp's interleaved-pair RoPE layout so q/k rows are in the HF (rotate-half) order.
    for i in range(config.num_layers if arch in _PERMUTED_QK else 0):
        for name, heads in (("q", config.num_heads), ("k", config.num_kv_heads)):
            for stored in (f"layers.{i}.{name}", f"layers.{i}.{name}_bias"):
                if stored in tensors:
                    tensors[stored] = tensors[stored].take_rows(unpermute_rows(heads, config.head_dim))

    template = _field(reader, "tokenizer.chat_template")
    eos_ids = (vocab.eos_id,) if vocab.eos_id is not None else ()
    return Checkpoint(path, "gguf", config, tensors, vocab, template, eos_ids)
