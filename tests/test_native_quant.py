"""The native quantized-matmul kernels (sidecar/model/native/quant_gemm.c) against slow references: an exact
emulation of their arithmetic in float64 (int8-rounded activations, integer dot products per group), gguf-py's
dequantization of the same blocks, and the float32 matmul of those weights within the error that rounding the
activations allows."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from sidecar.model.checkpoint import SourceTensor
from sidecar.model.native import FLAGS, QUANT_GEMM_SOURCE, QuantGemmKernel, build, quant_gemm_kernel
from sidecar.model.quant import INT4_GROUP, BlockLinear, NativeInt4Linear, int4_groups

KERNEL = quant_gemm_kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no C compiler or no AVX2 on this CPU")


def _random_groups(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.int32)
    scales = torch.rand(out, inp // INT4_GROUP, generator=g) * 0.01
    lows = (torch.rand(out, inp // INT4_GROUP, generator=g) - 0.2) * 0.08
    return codes, scales, lows


def _emulated(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor) -> torch.Tensor:
    """What quant_gemm.c computes, in float64: each group of x rounded to int8 (absmax / 127, ties to even),
    integer dot products with the codes, scaled; minus low times the rounded group's sum."""
    rows, inp = x.shape
    xg = x.double().reshape(rows, -1, INT4_GROUP)
    amax = xg.abs().amax(-1)
    xs = amax.float().div(127).double()  # the kernel's float32 scale
    inv = torch.where(amax > 0, 127 / amax.float(), torch.zeros_like(amax.float())).double()
    xq = torch.round((xg.float() * inv.float()[..., None]).double()).clamp(-127, 127)
    q = codes.double().reshape(codes.shape[0], -1, INT4_GROUP)
    dots = torch.einsum("ogj,ngj->nog", q, xq)
    sums = xs * xq.sum(-1)
    return (dots * scales.double()[None] * xs[:, None]).sum(-1) - (lows.double()[None] * sums[:, None]).sum(-1)


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 8, 13])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("inp", [256, 96, 32])
def test_kernel_equals_its_exact_emulation(rows, dtype, inp):
    """Row counts below, at and past the kernel's tiles (8, 4, 2, 1), both activation dtypes, and an odd number
    of groups (the kernel multiplies groups in pairs)."""
    codes, scales, lows = _random_groups(80, inp, seed=rows)
    layer = NativeInt4Linear(codes, scales, lows, KERNEL)
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(10 + rows)).to(dtype)
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 80)
    expected = _emulated(x, codes, scales, lows)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8  # float32 sums; bf16 output rounding
    assert ((got.double() - expected).abs() <= tol * expected.abs().max()).all()


def test_dequantized_weights_and_float_matmul():
    """The held weights are scale * q - low exactly; the product is the float32 matmul of those weights up
    to the activations' rounding to int8 (about half a percent of the output's scale)."""
    codes, scales, lows = _random_groups(64, 512, seed=1)
    layer = NativeInt4Linear(codes, scales, lows, KERNEL)
    w = scales.repeat_interleave(INT4_GROUP, 1) * codes.float() - lows.repeat_interleave(INT4_GROUP, 1)
    assert torch.equal(layer.dequantized(), w)
    x = torch.randn(6, 512, generator=torch.Generator().manual_seed(2))
    expected = x.double() @ w.double().t()
    rel = (layer(x).double() - expected).norm() / expected.norm()
    assert rel < 1e-2


def test_strided_rows_zero_groups_and_extreme_values():
    """A row view with a stride (a slice of a wider tensor), an all-zero group (scale 0, no division by
    zero) and values at the ends of bf16's range that still round to +-127."""
    codes, scales, lows = _random_groups(48, 128, seed=3)
    layer = NativeInt4Linear(codes, scales, lows, KERNEL)
    wide = torch.randn(4, 3 * 128, generator=torch.Generator().manual_seed(4)) * 1e3
    x = wide[:, 128:256]
    x[1, :INT4_GROUP] = 0
    x[2, 5] = 3e38
    x[3, 7] = -3e38
    got = layer(x)
    assert torch.isfinite(got[:2]).all()
    expected = _emulated(x, codes, scales, lows)
    assert torch.allclose(got[:2].double(), expected[:2], rtol=1e-5, atol=1e-6 * expected[:2].abs().max())


def test_batched_rows_equal_single_rows():
    """A row gives the same result alone or inside a batch (the serving guarantee: batching is invisible)."""
    codes, scales, lows = int4_groups(torch.randn(96, 256, generator=torch.Generator().manual_seed(5)))
    layer = NativeInt4Linear(codes, scales, lows, KERNEL)
    x = torch.randn(7, 1, 256, generator=torch.Generator().manual_seed(6)).bfloat16()
    batch = layer(x)
    assert batch.shape == (7, 1, 96)
    for i in range(7):
        assert torch.equal(layer(x[i]), batch[i])


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: each group of 32 rounded to int8 steps of absmax / 127, in float64."""
    rows = x.shape[0]
    xg = x.float().reshape(rows, -1, INT4_GROUP)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(xg * inv).clamp(-127, 127).double() * (amax / 127).double()).reshape(x.shape)


def random_blocks(kind: str, rows: int, cols: int, seed: int) -> SourceTensor:
    """Blocks of random bytes (every code, scale and min a real file can hold) with f16 d (and dmin) of a real
    model's size, so the values are finite and the products are in range."""
    size, values = {"Q4_K": (144, 256), "Q6_K": (210, 256), "Q8_0": (34, 32)}[kind]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // values, size), dtype=np.uint8)
    for at in {"Q4_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}[kind]:
        blocks[:, at:at + 2] = rng.uniform(1e-4, 2e-3, size=(len(blocks), 1)).astype(np.float16).view(np.uint8)
    return SourceTensor("w", kind, (rows, cols), blocks.reshape(rows, -1))


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blocks_kernels_equal_the_weights_times_the_rounded_activations(kind, rows, dtype):
    """Q4_K, Q6_K and Q8_0 blocks as stored: the kernel's result is gguf-py's weights times the int8-rounded
    activations (up to float32 sums), and within the rounding's error of the float32 matmul."""
    source = random_blocks(kind, 40, 512, seed=rows)
    layer = BlockLinear([source], KERNEL)
    weights = torch.from_numpy(dequantize(np.asarray(source.data), GGMLQuantizationType[kind])).reshape(40, 512)
    assert torch.equal(layer.dequantized(), weights)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(dtype)
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 40)
    exact = _rounded(x) @ weights.double().t()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((got.double() - exact).abs() <= tol * exact.abs().max()).all()
    float_matmul = x.double() @ weights.double().t()
    assert (got.double() - float_matmul).norm() / float_matmul.norm() < 1e-2


def test_blocks_of_several_parts_stack_their_rows():
    """A fused projection of two Q4_K matrices: the rows of each, in order (blocks are per row)."""
    first, second = random_blocks("Q4_K", 16, 256, seed=1), random_blocks("Q4_K", 8, 256, seed=2)
    layer = BlockLinear([first, second], KERNEL)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    assert torch.equal(layer(x), torch.cat([BlockLinear([first], KERNEL)(x), BlockLinear([second], KERNEL)(x)], -1))


def test_prompt_copy_of_blocks_and_of_mixed_parts():
    """Where prompt chunks read a bf16 copy (quant.PromptDenseLinear), the copy of Q4_K / Q6_K blocks and of a
    fused projection held per part is their weights rounded to bf16; decode steps still use the kernels."""
    from sidecar.model.quant import PromptDenseLinear, StackedLinear

    q4, q6 = random_blocks("Q4_K", 16, 256, seed=4), random_blocks("Q6_K", 8, 256, seed=5)
    stacked = StackedLinear([BlockLinear([q4], KERNEL), BlockLinear([q6], KERNEL)], ["q4_k", "q6_k"])
    assert (stacked.format, stacked.out_features) == ("q4_k+q6_k", 24)
    layer = PromptDenseLinear(stacked)
    assert torch.equal(layer.dense.weight, torch.cat([q4.to_float(), q6.to_float()]).bfloat16())
    g = torch.Generator().manual_seed(6)
    steps = torch.randn(3, 1, 256, generator=g).bfloat16()
    parts = [BlockLinear([q4], KERNEL)(steps), BlockLinear([q6], KERNEL)(steps)]
    assert torch.equal(layer(steps), torch.cat(parts, -1))
    chunk = torch.randn(1, 9, 256, generator=g).bfloat16()
    assert torch.equal(layer(chunk), torch.nn.functional.linear(chunk, layer.dense.weight))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the -march names are x86's")
@pytest.mark.parametrize("march,isa", [("x86-64-v3", "avx2"), ("x86-64", "scalar")])
def test_other_instruction_sets_compute_the_same(march, isa):
    """The same source built for CPUs without VNNI (AVX2's maddubs + madd) and without AVX2 (plain C): both
    equal the exact emulation, so a machine this one is not gets the same results."""
    flags = [f"-march={march}" if f == "-march=native" else f for f in FLAGS]
    kernel = QuantGemmKernel(build(QUANT_GEMM_SOURCE, flags))
    assert kernel.isa == isa
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(7))
    codes, scales, lows = _random_groups(24, 512, seed=8)
    assert torch.allclose(kernel.int4(x, NativeInt4Linear(codes, scales, lows, KERNEL).packed, scales, lows).double(),
                          _emulated(x, codes, scales, lows), rtol=1e-5, atol=1e-5)
    for kind in ("Q4_K", "Q6_K", "Q8_0"):
        source = random_blocks(kind, 24, 512, seed=9)
        weights = torch.from_numpy(dequantize(np.asarray(source.data), GGMLQuantizationType[kind])).reshape(24, 512)
        exact = _rounded(x) @ weights.double().t()
        got = kernel.blocks(kind, x, BlockLinear([source], KERNEL).blocks).double()
        assert torch.allclose(got, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
