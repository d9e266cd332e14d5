"""Random-weight GGUF files of a real model's shape, quantized as the files studios download (Q4_K_M).

Speed does not depend on what the weights are, only on their shape and block layout, so this writes
the blocks themselves: random codes with a fixed, sane super-scale (d) per block, in llama.cpp's
Q4_K_M mix — Q6_K for the output (tied) embedding and for attn_v and ffn_down in the layers
llama.cpp gives more bits (the first and last eighth, and every third between), Q4_K elsewhere,
F32 norms. Both the sidecar and llama.cpp load the same file; the tokenizer is random_model.py's
Llama-3-style vocabulary (every id decodes), written as GGUF metadata with its chat template.
No RoPE scaling is written (it changes no cost).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from tqdm import tqdm

from sidecar.bench.random_model import CHAT_TEMPLATE, ModelShape, build_tokenizer, get_shape, special_tokens

FORMAT_VERSION = 1
# (bytes per 256-value block, byte offset of the f16 `d`, its value): magnitudes of ~0.05, as trained weights.
_BLOCKS = {"Q4_K": (144, 0, 2e-4), "Q6_K": (210, 208, 1e-5)}


def q4_k_m_kind(name: str, layer: int, layers: int) -> str:
    """llama.cpp's Q4_K_M choice for a layer matrix (its `use_more_bits` rule for attn_v and ffn_down)."""
    more_bits = layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2
    return "Q6_K" if name in ("attn_v", "ffn_down") and more_bits else "Q4_K"


def _random_blocks(rng: np.random.Generator, kind: str, rows: int, cols: int) -> np.ndarray:
    size, d_offset, d = _BLOCKS[kind]
    raw = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    raw[..., d_offset:d_offset + 2] = np.array([d], dtype=np.float16).view(np.uint8)
    if kind == "Q4_K":
        raw[..., 2:4] = np.array([d / 2], dtype=np.float16).view(np.uint8)  # dmin
    return raw.reshape(rows, -1)


def _tokenizer_metadata(writer: gguf.GGUFWriter, shape: ModelShape) -> None:
    spec = json.loads(build_tokenizer(shape).to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])] + special_tokens(shape)
    first_special = len(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * first_special + [3] * (len(tokens) - first_special))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(first_special)
    writer.add_eos_token_id(first_special + 9)  # <|eot_id|>
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_random_gguf(path: Path, shape: ModelShape | str, seed: int = 0, progress: bool = True) -> Path:
    shape = get_shape(shape) if isinstance(shape, str) else shape
    c = shape.config
    if c.hidden_size % 256 or c.intermediate_size % 256 or (c.num_heads * c.head_dim) % 256:
        raise ValueError(f"{shape.name}: K-quant blocks hold 256 values; every matrix's columns must be a multiple")
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name(f"random {shape.name} Q4_K_M (sidecar/bench/random_gguf.py, format {FORMAT_VERSION})")
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    _tokenizer_metadata(writer, shape)

    def matrix(name: str, kind: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, _random_blocks(rng, kind, rows, cols), raw_dtype=GGMLQuantizationType[kind])

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(c.hidden_size, dtype=np.float32))

    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    matrix("token_embd.weight", "Q6_K", c.vocab_size, h)  # tied: the output head's kind, as llama.cpp picks
    for i in tqdm(range(c.num_layers), desc=f"writing random {shape.name} Q4_K_M", unit="layer", disable=not progress):
        norm(f"blk.{i}.attn_norm.weight")
        for name, rows, cols in (("attn_q", q, h), ("attn_k", kv, h), ("attn_v", kv, h), ("attn_output", h, q),
                                 ("ffn_gate", c.intermediate_size, h), ("ffn_up", c.intermediate_size, h),
                                 ("ffn_down", h, c.intermediate_size)):
            matrix(f"blk.{i}.{name}.weight", q4_k_m_kind(name, i, c.num_layers), rows, cols)
        norm(f"blk.{i}.ffn_norm.weight")
    norm("output_norm.weight")
    if not c.tie_embeddings:
        matrix("output.weight", "Q6_K", c.vocab_size, h)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
    partial.replace(path)  # a file under the final name is always complete
    return path


def ensure_random_gguf(root: Path, shape: ModelShape | str, seed: int = 0, progress: bool = True) -> Path:
    """root/<shape>-q4_k_m-s<seed>-v<format>.gguf, written unless it is there."""
    shape = get_shape(shape) if isinstance(shape, str) else shape
    path = Path(root) / f"{shape.name}-q4_k_m-s{seed}-v{FORMAT_VERSION}.gguf"
    return path if path.is_file() else write_random_gguf(path, shape, seed, progress)
