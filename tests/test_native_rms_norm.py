"""The native RMSNorm (sidecar/model/native/rms_norm.c) against Hugging Face's LlamaRMSNorm computed in float64 and
rounded as it rounds (the normalized row to bf16, then the weight's product to bf16), and against torch's
F.rms_norm, which the model calls without the kernel."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from sidecar.model.native import FLAGS, RMS_NORM_SOURCE, RmsNormKernel, build, rms_norm_kernel

KERNEL = rms_norm_kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no C compiler")


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values around each of x's."""
    exponent = torch.floor(torch.log2(x.double().abs().clamp_min(2.0**-126)))
    return 2.0 ** (exponent - 7)


@pytest.mark.parametrize("rows,hidden", [(1, 576), (8, 576), (300, 2048), (3, 100)])
def test_rms_norm_equals_the_definition(rows, hidden):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, hidden, generator=g) * torch.rand(rows, 1, generator=g) * 30).bfloat16()
    x[0, :5] = torch.tensor([300.0, -0.001, 0.0, 1e-30, -7.0])  # large, tiny, zero and denormal-sized values
    w = (torch.randn(hidden, generator=g) * 0.5 + 1).bfloat16()
    eps = 1e-5
    got = KERNEL(x, w, eps)
    xd = x.double()
    normalized = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)).bfloat16()
    want = (w.double() * normalized.double()).bfloat16()
    # float32 sums instead of float64 may move a value across a rounding boundary: at most one bf16 step each
    assert ((got.double() - want.double()).abs() <= _bf16_ulp(want)).all()
    assert (got == want).double().mean() > 0.99
    torch_says = F.rms_norm(x, (hidden,), w, eps)
    assert ((got.double() - torch_says.double()).abs() <= _bf16_ulp(torch_says)).all()


def test_strided_rows_and_leading_shapes():
    """Rows of a wider tensor (the model's last position of each row) and [B, T, H] inputs; each row on its own."""
    x = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    w = torch.ones(64).bfloat16()
    last = x[:, -1]  # strided rows
    assert torch.equal(KERNEL(last, w, 1e-6), KERNEL(last.contiguous(), w, 1e-6))
    whole = KERNEL(x, w, 1e-6)
    assert whole.shape == x.shape and torch.equal(whole[:, -1], KERNEL(last, w, 1e-6))
    assert torch.equal(whole[2:3], KERNEL(x[2:3], w, 1e-6))  # a row does not depend on the others


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the -march names are x86's")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_other_instruction_sets_compute_the_same(march):
    """Built for CPUs without AVX-512 and without AVX2: the same values as this machine's build, to one bf16 step
    (float32 sums in another order)."""
    kernel = RmsNormKernel(build(RMS_NORM_SOURCE, [f"-march={march}" if f == "-march=native" else f for f in FLAGS]))
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(2)).bfloat16()
    w = torch.rand(576, generator=torch.Generator().manual_seed(3)).bfloat16()
    here = KERNEL(x, w, 1e-5)
    assert ((kernel(x, w, 1e-5).double() - here.double()).abs() <= _bf16_ulp(here)).all()
