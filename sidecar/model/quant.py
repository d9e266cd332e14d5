"""Weight-only quantized linear layers: y = x @ W.T with W stored as int4, int8, bf16 or fp32.

CPU kernels (torch 2.13):
- int4: `_weight_int4pack_mm_for_cpu`, grouped affine, w = (q - 8) * scale + zero, group 32.
  GGUF Q4_1 (w = d*q + m), Q4_0 (w = d*(q - 8)) and Q4_K (each 32-value sub-block w = d*sc*q - dmin*m)
  blocks map onto it, so a 4-bit GGUF is repacked, never re-quantized.
- int8: `_weight_int8pack_mm`, symmetric per output channel.
Both are fast only with bf16 activations (fp32 activations are 7-30x slower), so the quantized
formats compute in bf16; fp32 activations still work and are what the exactness tests use.

CUDA kernels: int4 uses `_weight_int4pack_mm` (tinygemm; bf16 activations, compute capability
8.0+), the same grouped affine convention, so a GGUF Q4 tensor is still repacked exactly. int8
has no CUDA kernel in torch and is refused there (ModelConfig names the choice); bf16 is what
`--weights auto` picks on a GPU.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gguf.quants import Q4_K

from sidecar.model.checkpoint import SourceTensor

INT4_GROUP = 32
QK_K, Q4_K_BYTES = 256, 144  # a K-quant super-block: values, and bytes of a Q4_K one
COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16,
                 "auto": torch.bfloat16}
# `--weights auto` on a CPU, per matrix (docs/benchmarks.md, "What `--weights auto` picks"): sources of 4 bits
# or fewer become int4 (Q4_0, Q4_1 and Q4_K repacked exactly; Q2_K / Q3_K re-rounded onto int4's grid of 16
# levels); 5 bits and more, floats included, int8 per channel: never fewer bits than the file holds. A fused
# projection whose parts differ (Q4_K_M's Q6_K attn_v beside Q4_K q and k) takes int8.
INT4_SOURCES = ("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K")


class DenseLinear:
    """fp32 or bf16 weight [out, in]."""

    def __init__(self, weight: torch.Tensor, device: str = "cpu"):
        self.weight = weight.to(device).contiguous()
        self.out_features, self.in_features = weight.shape
        self.format = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(weight.dtype, "fp32")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float()


class Int8Linear:
    """int8 weight [out, in] with one scale per output channel: W = q * scale[:, None]."""

    format = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        self.qweight = qweight.contiguous()
        self.scales = scales.contiguous()
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype) -> Int8Linear:
        amax = weight.abs().amax(dim=1).clamp_min(1e-12)
        scales = amax / 127.0
        q = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales.to(dtype))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight, self.scales)
        return y.reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]


class Int4Linear:
    """4-bit codes q in [0, 15], groups of 32 along `in`: W[n, k] = (q - 8) * scale[g, n] + zero[g, n].

    `scales_and_zeros` is [in / 32, out, 2] in the activation dtype; `packed` is the CPU kernel's
    own layout of q.
    """

    format = "int4"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype,
                 device: str = "cpu"):
        # codes: int32 [out, in]; scales, zeros: float32 [out, in / 32]
        self.out_features, self.in_features = codes.shape
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            # tinygemm's input: two codes per byte, the even column in the high nibble.
            codes = codes.to(device=device, dtype=torch.int32)
            pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
            self.packed = torch.ops.aten._convert_weight_to_int4pack(pairs, _inner_k_tiles(self.in_features))
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        stored = torch.bfloat16 if self.cuda else dtype
        self.scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(device=device, dtype=stored)
        self.scales_and_zeros = self.scales_and_zeros.contiguous()

    @staticmethod
    def fits_cuda(out_features: int, in_features: int) -> bool:
        """Shapes tinygemm takes: rows a multiple of 8, columns of 32 (then inner tiles of 2 at least)."""
        return out_features % 8 == 0 and in_features % 32 == 0

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype, device: str = "cpu") -> Int4Linear:
        """Asymmetric min/max int4 of a float weight (for sources that are not 4-bit already)."""
        out, inp = weight.shape
        groups = weight.reshape(out, inp // INT4_GROUP, INT4_GROUP)
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        codes = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15)
        return cls(codes.reshape(out, inp).to(torch.int32), scale, lo + 8 * scale, dtype, device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if self.cuda:
            if rows.shape[0] == 0:  # tinygemm cannot launch an empty grid
                return x.new_empty(*lead, self.out_features)
            # tinygemm takes bf16 activations only (scales_and_zeros are bf16 on CUDA too)
            y = torch.ops.aten._weight_int4pack_mm(rows.to(torch.bfloat16).contiguous(), self.packed, INT4_GROUP,
                                                   self.scales_and_zeros).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), self.packed, INT4_GROUP,
                                                           self.scales_and_zeros)
        return y.reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        # The packed layout is the kernel's own; multiplying the identity reads W back through it.
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype, device=self.packed.device)
        return self(eye).t().float().cpu()


def _inner_k_tiles(in_features: int) -> int:
    """tinygemm's K tiling: the largest of 8, 4, 2 with in_features a multiple of 16 * tiles."""
    return next(tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0)


class PromptDenseLinear:
    """A quantized matrix for decode steps plus a bf16 copy of the same weights for prompt chunks.

    On CPUs with native bf16 matmuls (AVX512-BF16, AMX) a prompt chunk's matmul is ~2x faster from bf16
    than through the int4 kernel, while one position per row decodes faster from int4 (docs/benchmarks.md,
    "Prompt chunks from a bf16 copy"). The copy is the quantized matrix read back (`dequantized`), so the
    two phases use the same weights, rounded to bf16.
    """

    def __init__(self, compact: Int4Linear | Int8Linear):
        self.compact = compact
        self.dense = DenseLinear(compact.dequantized().to(torch.bfloat16))
        self.out_features, self.in_features = compact.out_features, compact.in_features
        self.format = compact.format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, in]: several positions per row is a prompt chunk; one is a decode step.
        if x.dim() == 3 and x.shape[1] > 1:
            return self.dense(x.to(torch.bfloat16)).to(x.dtype)
        return self.compact(x)

    def dequantized(self) -> torch.Tensor:
        return self.compact.dequantized()


Linear = DenseLinear | Int8Linear | Int4Linear | PromptDenseLinear


def q4_blocks_to_int4(source: SourceTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact (codes, scale, zero) of a Q4_0 / Q4_1 tensor in the int4 kernel's convention.

    Q4_1 block (20 bytes): f16 d, f16 m, 16 bytes of nibbles; w = d * q + m
      -> scale = d, zero = m + 8d.
    Q4_0 block (18 bytes): f16 d, 16 bytes of nibbles; w = d * (q - 8)
      -> scale = d, zero = 0.
    In both, byte j holds element j in its low nibble and element j + 16 in its high nibble.
    """
    rows, cols = source.shape
    header = 4 if source.kind == "Q4_1" else 2
    blocks = source.raw_blocks().reshape(rows, cols // INT4_GROUP, header + 16)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., header:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, cols)
    if source.kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8 * d
    else:
        zero = np.zeros_like(d)
    return torch.from_numpy(codes.astype(np.int32)), torch.from_numpy(d), torch.from_numpy(zero)


def q4_k_blocks_to_int4(source: SourceTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) of a Q4_K tensor in the int4 kernel's convention, with no second rounding.

    Q4_K super-block (144 bytes, 256 values): f16 d, f16 dmin, 12 bytes of 6-bit (sc, m) pairs for its
    eight 32-value sub-blocks, 128 bytes of nibbles; w = (d * sc) * q - dmin * m, so each sub-block is
    one affine 4-bit group: scale = d * sc and the codes are kept as they are (d * sc and dmin * m are
    exact in fp32: 11 + 6 bits). zero = 8 * scale - dmin * m is the one value the kernel's convention
    makes us compute; it can round, and then a weight of that group differs from gguf-py's by one ulp
    (about 0.15% of groups on random blocks; tests/test_quant.py). Nibbles: bytes 32j..32j+31 hold
    sub-block 2j in their low nibbles and 2j + 1 in their high ones.
    """
    rows, cols = source.shape
    blocks = source.raw_blocks().reshape(rows * (cols // QK_K), Q4_K_BYTES)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    scale = d * sc.astype(np.float32)
    low = dmin * m.astype(np.float32)
    nibbles = blocks[:, 16:].reshape(-1, 4, 1, 32)
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=2).reshape(rows, cols)
    groups = (rows, cols // INT4_GROUP)
    return (torch.from_numpy(codes.astype(np.int32)), torch.from_numpy(scale.reshape(groups)),
            torch.from_numpy((np.float32(8) * scale - low).reshape(groups)))


REPACKED_INT4 = {"Q4_0": q4_blocks_to_int4, "Q4_1": q4_blocks_to_int4, "Q4_K": q4_k_blocks_to_int4}


def build_linear(parts: list[SourceTensor], fmt: str, dtype: torch.dtype | None = None,
                 device: str = "cpu") -> Linear:
    """One linear layer from one or more stored matrices stacked along `out` (fused q/k/v, gate/up).

    `dtype` is the activation dtype; it defaults to the format's compute dtype. The weights are
    prepared on the CPU and end on `device`. `fmt` "auto" picks int4 or int8 from the stored kinds
    (INT4_SOURCES); the result's `format` says what it became.
    """
    dtype = dtype or COMPUTE_DTYPE[fmt]
    if fmt == "auto":
        fmt = "int4" if all(p.kind in INT4_SOURCES for p in parts) else "int8"
    out_features, in_features = sum(p.shape[0] for p in parts), parts[0].shape[1]
    on_cuda = torch.device(device).type == "cuda"
    int4_fits = Int4Linear.fits_cuda(out_features, in_features) if on_cuda else in_features % INT4_GROUP == 0
    if fmt == "int4" and int4_fits:
        if all(p.kind in REPACKED_INT4 for p in parts):
            decoded = [REPACKED_INT4[p.kind](p) for p in parts]
            codes, scales, zeros = (torch.cat([d[i] for d in decoded]) for i in range(3))
            return Int4Linear(codes, scales, zeros, dtype, device)
        return Int4Linear.quantize(_stacked_float(parts), dtype, device)
    if fmt in ("int4", "int8") and not on_cuda:
        # int4 needs `in` to be a multiple of 32; such rare matrices fall back to int8.
        return Int8Linear.quantize(_stacked_float(parts), dtype)
    # (on CUDA, a matrix tinygemm cannot take stays in the activation dtype)
    return DenseLinear(_stacked_float(parts).to(dtype), device)


def _stacked_float(parts: list[SourceTensor]) -> torch.Tensor:
    return torch.cat([p.to_float() for p in parts]) if len(parts) > 1 else parts[0].to_float()
