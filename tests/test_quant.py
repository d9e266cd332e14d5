"""Quantized linear layers against slow float32 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from sidecar.model.checkpoint import SourceTensor
from sidecar.model.native import quant_gemm_kernel
from sidecar.model.quant import DenseLinear, Int4Linear, Int8Linear, NativeInt4Linear, PromptDenseLinear, build_linear


def _reference(source: SourceTensor) -> torch.Tensor:
    """gguf-py's own dequantization: the format's definition, independent of our repacking."""
    raw = np.asarray(source.data)
    return torch.from_numpy(np.array(dequantize(raw, GGMLQuantizationType[source.kind]), dtype=np.float32))


def test_int4_from_q4_1_is_exact(checkpoint):
    """Q4_1 blocks repacked into the int4 kernel: same weights, bit for bit, at fp32."""
    source = checkpoint.tensor("layers.3.gate")
    assert source.kind == "Q4_1"
    ref = _reference(source)
    layer = build_linear([source], "int4", torch.float32)
    assert isinstance(layer, Int4Linear)
    assert torch.equal(layer.dequantized(), ref)
    x = torch.randn(5, ref.shape[1], generator=torch.Generator().manual_seed(0))
    expected = x.double() @ ref.double().t()
    # fp32 activations: the kernel equals the dequantized matmul up to fp32 summation rounding.
    assert (layer(x).double() - expected).abs().max() < 1e-4
    # bf16 activations (the fast path): only activation/scale rounding to bf16 remains.
    bf16 = build_linear([source], "int4")
    rel = (bf16(x.bfloat16()).double() - expected).norm() / expected.norm()
    assert rel < 1e-2


def test_int4_from_q4_0_is_exact():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.1, size=(64, 128)).astype(np.float32)
    source = SourceTensor("w", "Q4_0", (64, 128), quantize(w, GGMLQuantizationType.Q4_0))
    layer = build_linear([source], "int4", torch.float32)
    assert torch.equal(layer.dequantized(), _reference(source))


def _random_q4_k(rows: int, cols: int, seed: int) -> SourceTensor:
    """Q4_K blocks with random codes, 6-bit scales and mins, and f16 d / dmin of a real model's size."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
    for lo in (0, 2):  # d, dmin
        blocks[:, lo:lo + 2] = rng.uniform(1e-4, 2e-3, size=(len(blocks), 1)).astype(np.float16).view(np.uint8)
    return SourceTensor("w", "Q4_K", (rows, cols), blocks.reshape(rows, -1))


def test_int4_from_q4_k_is_repacked_not_requantized():
    """Each 32-value sub-block of Q4_K is an affine 4-bit group: codes and scales carried over as they are.
    In torch's kernel (fp32 activations) the zero point (8 * scale - dmin * m) is the one rounding left: a
    weight is gguf-py's or one ulp from it. (The native kernel, served, holds them exactly: below.)"""
    source = _random_q4_k(64, 512, seed=5)
    ref = _reference(source).reshape(64, 512)
    layer = build_linear([source], "int4", torch.float32)
    assert isinstance(layer, Int4Linear)
    got = layer.dequantized()
    ulp = torch.from_numpy(np.spacing(np.abs(ref.numpy())))
    assert ((got - ref).abs() <= ulp).all()
    assert (got == ref).float().mean() > 0.995
    # Re-quantizing the dequantized weights instead (what a Q4_K tensor used to get) loses far more.
    requantized = Int4Linear.quantize(ref, torch.float32).dequantized()
    assert (requantized - ref).abs().max() > 1000 * (got - ref).abs().max()
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
    expected = x.double() @ ref.double().t()
    assert (layer(x).double() - expected).abs().max() < 1e-4


@pytest.mark.skipif(quant_gemm_kernel() is None, reason="no C compiler or no AVX2 on this CPU")
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_served_int4_holds_gguf_weights_bit_exactly(kind):
    """With bf16 activations (what is served) a 4-bit GGUF matrix goes to the native kernel, which keeps each
    group's float32 scale and low as stored: every weight equals gguf-py's dequantization, bit for bit."""
    if kind == "Q4_K":
        source = _random_q4_k(64, 512, seed=7)
    else:
        w = np.random.default_rng(8).normal(0, 0.1, size=(64, 512)).astype(np.float32)
        source = SourceTensor("w", kind, (64, 512), quantize(w, GGMLQuantizationType[kind]))
    layer = build_linear([source], "int4")
    assert isinstance(layer, NativeInt4Linear)
    ref = _reference(source).reshape(64, 512)
    assert torch.equal(layer.dequantized(), ref)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(9)).bfloat16()
    expected = x.double() @ ref.double().t()
    assert (layer(x).double() - expected).norm() / expected.norm() < 1e-2


def test_fused_projection_stacks_parts_in_order(checkpoint):
    parts = [checkpoint.tensor(f"layers.0.{n}") for n in ("q", "k", "v")]
    layer = build_linear(parts, "int4", torch.float32)
    # Rows of q were permuted at load; the reference is the permuted float tensor.
    assert torch.equal(layer.dequantized(), torch.cat([p.to_float() for p in parts]))


@pytest.mark.parametrize("weights,cls,max_rel", [("int8", Int8Linear, 0.02), ("bf16", DenseLinear, 0.01),
                                                  ("fp32", DenseLinear, 1e-6)])
def test_other_formats_close_to_float_reference(checkpoint, weights, cls, max_rel):
    source = checkpoint.tensor("layers.5.down")
    ref = _reference(source)
    layer = build_linear([source], weights)
    assert isinstance(layer, cls)
    x = torch.randn(7, ref.shape[1], generator=torch.Generator().manual_seed(2))
    expected = x.double() @ ref.double().t()
    got = layer(x.to(torch.float32 if weights == "fp32" else torch.bfloat16)).double()
    assert (got - expected).norm() / expected.norm() < max_rel


def test_int4_requantizes_float_sources_within_4_bit_error():
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(3))
    layer = Int4Linear.quantize(w, torch.float32)
    err = (layer.dequantized() - w).abs()
    # Asymmetric 4-bit over groups of 32: error at most half a step (range / 15 / 2) per group.
    step = (w.reshape(96, 8, 32).amax(-1) - w.reshape(96, 8, 32).amin(-1)) / 15
    assert (err.reshape(96, 8, 32) <= step[..., None] / 2 + 1e-6).all()


def test_int8_per_channel_roundtrip():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    layer = Int8Linear.quantize(w, torch.float32)
    assert (layer.dequantized() - w).abs().max() <= w.abs().amax() / 127 / 2 + 1e-6


def _native_int4(weight: torch.Tensor, dtype: torch.dtype) -> NativeInt4Linear:
    from sidecar.model.quant import int4_groups
    return NativeInt4Linear(*int4_groups(weight), quant_gemm_kernel())


@pytest.mark.parametrize("quantize", [Int4Linear.quantize, Int8Linear.quantize, pytest.param(
    _native_int4, marks=pytest.mark.skipif(quant_gemm_kernel() is None, reason="no native int4 kernel"))])
def test_prompt_chunks_use_the_bf16_copy_and_decode_steps_the_kernel(quantize):
    """Several positions per row (a prompt chunk) multiply the bf16 copy of the quantized matrix; one position
    per row (a decode step) goes through the quantized kernel; both hold the same weights."""
    g = torch.Generator().manual_seed(5)
    compact = quantize(torch.randn(96, 256, generator=g), torch.bfloat16)
    layer = PromptDenseLinear(compact)
    assert torch.equal(layer.dense.weight.float(), compact.dequantized().bfloat16().float())
    assert (layer.format, layer.out_features, layer.in_features) == (compact.format, 96, 256)
    chunk = torch.randn(1, 17, 256, generator=g).bfloat16()
    assert torch.equal(layer(chunk), torch.nn.functional.linear(chunk, layer.dense.weight))
    steps = torch.randn(6, 1, 256, generator=g).bfloat16()
    assert torch.equal(layer(steps), compact(steps))
    assert torch.equal(layer.dequantized(), compact.dequantized())
