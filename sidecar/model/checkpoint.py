"""A base-model checkpoint as the rest of the model code sees it, whatever file it came from.

Tensors keep their stored encoding (`SourceTensor.kind`) until quant.py decides what to do with
them, so a 4-bit source can become int4 weights without ever being dequantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from sidecar.errors import ModelFileError
from sidecar.model.config import LlamaConfig
from sidecar.model.vocab import GgufVocab, HfTokenizerFiles

# Float encodings and the GGML block quantizations the loader accepts.
FLOAT_KINDS = ("F32", "F16", "BF16")
QUANT_KINDS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_KINDS = FLOAT_KINDS + QUANT_KINDS

# Per layer: the canonical short names used everywhere below the loaders.
LAYER_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
LAYER_NORMS = ("attn_norm", "ffn_norm")
LAYER_BIASES = ("q_bias", "k_bias", "v_bias")  # only where config.qkv_bias (Qwen2)


@dataclass(frozen=True)
class SourceTensor:
    """One stored tensor. `shape` is the torch shape ([out, in] for matrices).

    `data` is the stored payload: a float array for float kinds, or the raw GGML blocks as
    uint8 `[rows, bytes_per_row]` for quantized kinds (each row is quantized on its own, so
    rows can be permuted or concatenated without touching the encoding).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    data: np.ndarray | torch.Tensor

    def to_float(self) -> torch.Tensor:
        """The tensor as float32 in its torch shape."""
        if isinstance(self.data, torch.Tensor):
            return self.data.to(torch.float32).reshape(self.shape)
        if self.kind == "F32":
            array = np.array(self.data, dtype=np.float32)  # a copy: GGUF data is a read-only memmap
        else:
            array = dequantize(np.asarray(self.data), GGMLQuantizationType[self.kind])
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(self.shape)

    def take_rows(self, index: torch.Tensor) -> SourceTensor:
        """The same tensor with its rows (output channels) reordered by `index`."""
        if isinstance(self.data, torch.Tensor):
            return SourceTensor(self.name, self.kind, self.shape, self.data[index])
        return SourceTensor(self.name, self.kind, self.shape, np.asarray(self.data)[index.numpy()])

    def raw_blocks(self) -> np.ndarray:
        """The raw GGML blocks, uint8 [rows, bytes_per_row] (quantized kinds only)."""
        assert self.kind in QUANT_KINDS, self.kind
        return np.asarray(self.data).reshape(self.shape[0], -1).view(np.uint8)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    format: str  # "gguf" or "safetensors"
    config: LlamaConfig
    tensors: dict[str, SourceTensor]
    tokenizer: GgufVocab | HfTokenizerFiles
    chat_template: str | None
    eos_ids: tuple[int, ...] = field(default=())

    def tensor(self, name: str) -> SourceTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFileError(self.path, f"missing tensor {name!r}") from None


def required_tensors(config: LlamaConfig) -> list[str]:
    names = ["embed", "norm"] + ([] if config.tie_embeddings else ["head"])
    for i in range(config.num_layers):
        names += [f"layers.{i}.{m}" for m in LAYER_MATRICES + LAYER_NORMS]
        if config.qkv_bias:
            names += [f"layers.{i}.{b}" for b in LAYER_BIASES]
    return names


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    c = config
    per_layer = {
        "q": (c.q_size, c.hidden_size), "k": (c.kv_size, c.hidden_size), "v": (c.kv_size, c.hidden_size),
        "o": (c.hidden_size, c.q_size), "gate": (c.intermediate_size, c.hidden_size),
        "up": (c.intermediate_size, c.hidden_size), "down": (c.hidden_size, c.intermediate_size),
        "attn_norm": (c.hidden_size,), "ffn_norm": (c.hidden_size,),
        "q_bias": (c.q_size,), "k_bias": (c.kv_size,), "v_bias": (c.kv_size,),
    }
    shapes = {"embed": (c.vocab_size, c.hidden_size), "norm": (c.hidden_size,), "head": (c.vocab_size, c.hidden_size)}
    for i in range(c.num_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def validate(path: Path, config: LlamaConfig, tensors: dict[str, SourceTensor]) -> None:
    """Every tensor the forward needs is present, with the shape the config implies."""
    shapes = expected_shapes(config)
    for name in required_tensors(config):
        if name not in tensors:
            raise ModelFileError(path, f"missing tensor {name!r}")
        if tuple(tensors[name].shape) != shapes[name]:
            stored = tensors[name]
            raise ModelFileError(path, f"tensor {stored.name!r} has shape {list(stored.shape)}, "
                                       f"expected {list(shapes[name])}")


def unpermute_rows(num_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (HF rotate-half layout <- interleaved pairs).

    llama.cpp stores row (head h, pair j, half t) at h*head_dim + 2j + t; Hugging Face keeps it at
    h*head_dim + t*head_dim/2 + j. Returns `index` with `hf_weight = gguf_weight[index]`.
    """
    return torch.arange(num_heads * head_dim).reshape(num_heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


def load_checkpoint(path: Path) -> Checkpoint:
    """A GGUF file or a Hugging Face folder (config.json + *.safetensors)."""
    path = Path(path)
    if path.is_dir():
        from sidecar.model.hf_folder import load_hf_folder

        return load_hf_folder(path)
    if not path.exists():
        raise ModelFileError(path, "no such file")
    from sidecar.model.gguf import load_gguf

    return load_gguf(path)
