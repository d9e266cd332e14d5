"""Weight-only quantized linear layers: y = x @ W.T with W stored as int4, int8, bf16 or fp32.

Every 4-bit matrix is held as groups of 32 along `in`, w = scale * q - low, q in [0, 15], scale and low
float32: GGUF Q4_0 (w = d*(q - 8)), Q4_1 (w = d*q + m) and Q4_K (each 32-value sub-block w = d*sc*q - dmin*m)
are such groups as stored, so a 4-bit GGUF is repacked, never re-quantized, and its weights are
gguf-py's to the last bit.

CPU kernels:
- int4 with bf16 activations (what is served): the native kernel (native/quant_gemm.c, NativeInt4Linear) where
  it has a vector path (AVX2 / VNNI): float32 scales, activations rounded per group of 32 to int8, one integer
  dot product per group, as llama.cpp multiplies Q4 blocks.
- int4 otherwise: torch's `_weight_int4pack_mm_for_cpu` (Int4Linear), w = (q - 8) * scale + zero with
  scale and zero in the activation dtype; fp32 activations there are what the exactness tests use.
- int8: `_weight_int8pack_mm`, symmetric per output channel.
torch's kernels are fast only with bf16 activations (fp32 activations are 7-30x slower), so the
quantized formats compute in bf16.

CUDA kernels: int4 uses `_weight_int4pack_mm` (tinygemm; bf16 activations, compute capability
8.0+), the same grouped affine convention, so a GGUF Q4 tensor is still repacked exactly. int8
has no CUDA kernel in torch and is refused there (ModelConfig names the choice); bf16 is what
`--weights auto` picks on a GPU.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import Q4_K, dequantize

from sidecar.model.checkpoint import SourceTensor
from sidecar.model.native import BLOCK_BYTES, QuantGemmKernel, quant_gemm_kernel

INT4_GROUP = 32
QK_K = 256  # values in a K-quant super-block
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
    """torch's int4 kernels. 4-bit codes q in [0, 15], groups of 32 along `in`:
    W[n, k] = (q - 8) * scale[g, n] + zero[g, n].

    `scales_and_zeros` is [in / 32, out, 2] in the activation dtype; `packed` is the kernel's own layout of q.
    """

    format = "int4"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor, dtype: torch.dtype,
                 device: str = "cpu"):
        # codes: int32 [out, in]; scales, lows: float32 [out, in / 32] with w = scale * q - low
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
        # The kernel's zero is the one value its convention makes us compute: it can round (one ulp in ~0.15%
        # of Q4_K's groups; tests/test_quant.py), and in bf16 the scales round too. NativeInt4Linear keeps both.
        zeros = 8 * scales - lows
        self.scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(device=device, dtype=stored)
        self.scales_and_zeros = self.scales_and_zeros.contiguous()

    @staticmethod
    def fits_cuda(out_features: int, in_features: int) -> bool:
        """Shapes tinygemm takes: rows a multiple of 8, columns of 32 (then inner tiles of 2 at least)."""
        return out_features % 8 == 0 and in_features % 32 == 0

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype, device: str = "cpu") -> Int4Linear:
        """Asymmetric min/max int4 of a float weight (for sources that are not 4-bit already)."""
        return cls(*int4_groups(weight), dtype, device)

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


class NativeInt4Linear:
    """4-bit groups as GGUF stores them (w = scale * q - low, float32 scale and low) multiplied by the native
    kernel (native/quant_gemm.c) with int8-rounded activations, as llama.cpp multiplies Q4 blocks.

    `packed` [out, in / 2]: 16 bytes a group, byte j holding element j (low nibble) and j + 16 (high).
    """

    format = "int4"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor, kernel: QuantGemmKernel):
        self.out_features, self.in_features = codes.shape
        groups = codes.to(torch.uint8).reshape(self.out_features, -1, INT4_GROUP)
        half = INT4_GROUP // 2
        self.packed = (groups[..., :half] | (groups[..., half:] << 4)).reshape(self.out_features, -1).contiguous()
        self.scales = scales.to(torch.float32).contiguous()
        self.lows = lows.to(torch.float32).contiguous()
        self.kernel = kernel
        self._weights = kernel.int4_weights(self.packed, self.scales, self.lows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        return self.kernel.run_int4(rows, self._weights).reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weights in float32, computed as gguf-py does (scale * q exact, one rounding for the low)."""
        groups = self.packed.reshape(self.out_features, -1, INT4_GROUP // 2)
        codes = torch.cat([groups & 0x0F, groups >> 4], dim=-1).to(torch.float32)
        w = self.scales[..., None] * codes - self.lows[..., None]
        return w.reshape(self.out_features, self.in_features)


class BlockLinear:
    """GGUF Q4_K, Q6_K or Q8_0 blocks kept as stored (4.5 / 6.56 / 8.5 bits a weight, nothing re-rounded),
    multiplied by the native kernels (native/quant_gemm.c) with int8-rounded activations, as llama.cpp
    multiplies them. `blocks` is uint8 [out, bytes a row], each row its own blocks; `format` is the kind in
    lower case ("q4_k")."""

    def __init__(self, parts: list[SourceTensor], kernel: QuantGemmKernel):
        self.kind = parts[0].kind
        self.format = self.kind.lower()
        self.out_features, self.in_features = sum(p.shape[0] for p in parts), parts[0].shape[1]
        self.blocks = torch.from_numpy(np.concatenate([p.raw_blocks() for p in parts]))  # a copy: GGUF is a memmap
        self.kernel = kernel

    @staticmethod
    def takes(parts: list[SourceTensor]) -> bool:
        kind = parts[0].kind
        values = BLOCK_BYTES[kind][1] if kind in BLOCK_BYTES else 0
        return len({p.kind for p in parts}) == 1 and values > 0 and parts[0].shape[1] % values == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        return self.kernel.blocks(self.kind, rows, self.blocks).reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """gguf-py's dequantization of the blocks (the format's definition)."""
        w = dequantize(self.blocks.numpy(), GGMLQuantizationType[self.kind])
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(self.out_features, self.in_features)


class BlockEmbedding:
    """The token-embedding table kept as its GGUF blocks (any quantized kind): a lookup dequantizes only the
    rows it reads (gguf-py's dequantization, then the activation dtype), so the table costs its stored bytes
    rather than two bytes a value (a 1B model's 128256 x 2048 Q6_K table: 216 MB against 525 MB in bf16).
    Values equal the dense table's: the same dequantization, the same cast. `blocks` may be a tied output
    head's (BlockLinear.blocks), so the two share one copy."""

    def __init__(self, source: SourceTensor, dtype: torch.dtype, blocks: torch.Tensor | None = None):
        self.kind = GGMLQuantizationType[source.kind]
        self.num_embeddings, self.embedding_dim = source.shape
        self.blocks = blocks if blocks is not None else torch.from_numpy(source.raw_blocks().copy())
        self.dtype = dtype

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.blocks[tokens.reshape(-1)].numpy()
        values = torch.from_numpy(np.ascontiguousarray(dequantize(rows, self.kind), dtype=np.float32))
        return values.to(self.dtype).reshape(*tokens.shape, self.embedding_dim)


class StackedLinear:
    """A fused projection whose parts are held in different formats (Q4_K_M's Q6_K attn_v beside Q4_K q and k):
    each part multiplied by its own kernel, outputs side by side."""

    def __init__(self, parts: list[Linear], part_formats: list[str]):
        self.parts = parts
        self.part_formats = part_formats  # one per stored matrix, for the startup log
        self.out_features, self.in_features = sum(p.out_features for p in parts), parts[0].in_features
        self.format = "+".join(dict.fromkeys(p.format for p in parts))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def dequantized(self) -> torch.Tensor:
        return torch.cat([p.dequantized() for p in self.parts])


def int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max 4-bit groups (codes, scale, low) of a float weight: for sources not 4-bit already."""
    out, inp = weight.shape
    groups = weight.float().reshape(out, inp // INT4_GROUP, INT4_GROUP)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    codes = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return codes.reshape(out, inp).to(torch.int32), scale, -lo


class PromptDenseLinear:
    """A quantized matrix for decode steps plus a bf16 copy of the same weights for prompt chunks.

    On CPUs with native bf16 matmuls (AVX512-BF16, AMX) a prompt chunk's matmul is ~2x faster from bf16
    than through the int4 kernel, while one position per row decodes faster from int4 (docs/benchmarks.md,
    "Prompt chunks from a bf16 copy"). The copy is the quantized matrix read back (`dequantized`), so the
    two phases use the same weights, rounded to bf16.
    """

    def __init__(self, compact: Int4Linear | NativeInt4Linear | BlockLinear | Int8Linear | StackedLinear):
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


Linear = DenseLinear | Int8Linear | Int4Linear | NativeInt4Linear | BlockLinear | StackedLinear | PromptDenseLinear
# the kinds a bf16 prompt copy can stand beside
QUANTIZED = (Int4Linear, NativeInt4Linear, BlockLinear, Int8Linear, StackedLinear)


def q4_blocks_to_int4(source: SourceTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact (codes, scale, low) of a Q4_0 / Q4_1 tensor, w = scale * q - low.

    Q4_1 block (20 bytes): f16 d, f16 m, 16 bytes of nibbles; w = d * q + m
      -> scale = d, low = -m.
    Q4_0 block (18 bytes): f16 d, 16 bytes of nibbles; w = d * (q - 8)
      -> scale = d, low = 8d (exact: d * q and 8d are exact in fp32, so is their difference).
    In both, byte j holds element j in its low nibble and element j + 16 in its high nibble.
    """
    rows, cols = source.shape
    header = 4 if source.kind == "Q4_1" else 2
    blocks = source.raw_blocks().reshape(rows, cols // INT4_GROUP, header + 16)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., header:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, cols)
    if source.kind == "Q4_1":
        low = -blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    else:
        low = np.float32(8) * d
    return torch.from_numpy(codes.astype(np.int32)), torch.from_numpy(d), torch.from_numpy(low)


def q4_k_blocks_to_int4(source: SourceTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, low) of a Q4_K tensor, w = scale * q - low, with no second rounding.

    Q4_K super-block (144 bytes, 256 values): f16 d, f16 dmin, 12 bytes of 6-bit (sc, m) pairs for its
    eight 32-value sub-blocks, 128 bytes of nibbles; w = (d * sc) * q - dmin * m, so each sub-block is
    one affine 4-bit group: scale = d * sc, low = dmin * m and the codes are kept as they are (d * sc and
    dmin * m are exact in fp32: 11 + 6 bits). Nibbles: bytes 32j..32j+31 hold sub-block 2j in their low
    nibbles and 2j + 1 in their high ones.
    """
    rows, cols = source.shape
    blocks = source.raw_blocks().reshape(rows * (cols // QK_K), BLOCK_BYTES["Q4_K"][0])
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    scale = d * sc.astype(np.float32)
    low = dmin * m.astype(np.float32)
    nibbles = blocks[:, 16:].reshape(-1, 4, 1, 32)
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=2).reshape(rows, cols)
    groups = (rows, cols // INT4_GROUP)
    return (torch.from_numpy(codes.astype(np.int32)), torch.from_numpy(scale.reshape(groups)),
            torch.from_numpy(low.reshape(groups)))


REPACKED_INT4 = {"Q4_0": q4_blocks_to_int4, "Q4_1": q4_blocks_to_int4, "Q4_K": q4_k_blocks_to_int4}


def build_linear(parts: list[SourceTensor], fmt: str, dtype: torch.dtype | None = None,
                 device: str = "cpu") -> Linear:
    """One linear layer from one or more stored matrices stacked along `out` (fused q/k/v, gate/up).

    `dtype` is the activation dtype; it defaults to the format's compute dtype. The weights are
    prepared on the CPU and end on `device`. `fmt` "auto" keeps Q4_K and Q6_K blocks as stored where the
    native kernels run, else picks int4 or int8 from the stored kinds (INT4_SOURCES); the result's `format`
    says what it became.
    """
    dtype = dtype or COMPUTE_DTYPE[fmt]
    on_cuda = torch.device(device).type == "cuda"
    # bf16 activations (served) on a CPU go to the native kernels; fp32 ones (the exactness tests) to torch's
    kernel = quant_gemm_kernel() if torch.device(device).type == "cpu" and dtype == torch.bfloat16 else None
    if fmt == "auto":
        if kernel is not None:
            runs = _runs_of_one_format(parts)
            if len(runs) > 1:  # q and k Q4_K, v Q6_K: each part in its own format
                built = [build_linear(run, "auto", dtype, device) for run in runs]
                return StackedLinear(built, [b.format for b, run in zip(built, runs, strict=True) for _ in run])
            if BlockLinear.takes(parts):
                return BlockLinear(parts, kernel)  # as stored: no bits lost, the fewest bytes to read
        fmt = "int4" if all(p.kind in INT4_SOURCES for p in parts) else "int8"
    out_features, in_features = sum(p.shape[0] for p in parts), parts[0].shape[1]
    int4_fits = Int4Linear.fits_cuda(out_features, in_features) if on_cuda else in_features % INT4_GROUP == 0
    if fmt == "int4" and int4_fits:
        if all(p.kind in REPACKED_INT4 for p in parts):
            decoded = [REPACKED_INT4[p.kind](p) for p in parts]
            codes, scales, lows = (torch.cat([d[i] for d in decoded]) for i in range(3))
        else:
            codes, scales, lows = int4_groups(_stacked_float(parts))
        if kernel is not None:
            return NativeInt4Linear(codes, scales, lows, kernel)
        return Int4Linear(codes, scales, lows, dtype, device)
    if fmt in ("int4", "int8") and not on_cuda:
        # int4 needs `in` to be a multiple of 32; such rare matrices fall back to int8.
        return Int8Linear.quantize(_stacked_float(parts), dtype)
    # (on CUDA, a matrix tinygemm cannot take stays in the activation dtype)
    return DenseLinear(_stacked_float(parts).to(dtype), device)


def _runs_of_one_format(parts: list[SourceTensor]) -> list[list[SourceTensor]]:
    """Consecutive parts that `auto` holds in one format (with the native kernels): Q4_K and Q6_K blocks as
    stored, other 4-bit sources int4, the rest int8."""
    def choice(p: SourceTensor) -> str:
        return p.kind if BlockLinear.takes([p]) else "int4" if p.kind in INT4_SOURCES else "int8"

    runs: list[list[SourceTensor]] = []
    for p in parts:
        if runs and choice(runs[-1][-1]) == choice(p):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _stacked_float(parts: list[SourceTensor]) -> torch.Tensor:
    return torch.cat([p.to_float() for p in parts]) if len(parts) > 1 else parts[0].to_float()
