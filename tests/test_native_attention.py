"""The native decode attention (sidecar/model/native/attention.c) against a float64 loop: each row's one query
against its own keys and values in the K/V cache, rows anywhere in the cache, GQA groups, several head dims; the
result rounded to bf16 once. A row's result never depends on the rows beside it."""

from __future__ import annotations

import platform

import pytest
import torch

from sidecar.model.native import ATTENTION_SOURCE, FLAGS, DecodeAttentionKernel, build, decode_attention_kernel
from tests.rounding import U_BF16

KERNEL = decode_attention_kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no C compiler")


def _cache(rows: int, kv_heads: int, length: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, kv_heads, length, dim, generator=g).bfloat16(),
            torch.randn(rows, kv_heads, length, dim, generator=g).bfloat16())


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: list[int], lens: list[int],
               scale: float) -> torch.Tensor:
    """The definition, in float64, one row and head at a time."""
    batch, heads, _ = q.shape
    group = heads // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            keys, values = k[rows[b], h // group, : lens[b]].double(), v[rows[b], h // group, : lens[b]].double()
            weights = torch.softmax(keys @ q[b, h].double() * scale, dim=0)
            out[b, h] = weights @ values
    return out


def _queries(batch: int, heads: int, kv_heads: int, dim: int, seed: int) -> torch.Tensor:
    """q as the model hands it over: the query heads of a fused [B, H + 2 KVH, D] projection (a strided view)."""
    fused = torch.randn(batch, heads + 2 * kv_heads, dim, generator=torch.Generator().manual_seed(seed)).bfloat16()
    return fused[:, :heads]


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 8, 64), (4, 4, 128), (8, 1, 80), (16, 16, 32)])
def test_decode_attention_equals_the_float64_definition(heads, kv_heads, dim):
    k, v = _cache(rows=6, kv_heads=kv_heads, length=400, dim=dim, seed=dim)
    rows, lens = [4, 0, 2, 5], [1, 7, 400, 173]  # rows anywhere in the cache, lengths of their own
    q = _queries(len(rows), heads, kv_heads, dim, seed=heads)
    scale = dim ** -0.5
    got = KERNEL(q, k, v, torch.tensor(rows), torch.tensor(lens), scale)
    want = _reference(q, k, v, rows, lens, scale)
    # rounded to bf16 once (half a bf16 spacing of each value), after float32 sums (far below that)
    assert ((got.double() - want).abs() <= U_BF16 * want.abs() + 1e-5).all()
    # one key: its value exactly
    assert torch.equal(got[0], v[4, torch.arange(heads) // (heads // kv_heads), 0])


def test_extreme_scores_and_batch_invariance():
    """Scores far apart (one key takes all the weight), all equal (the mean of the values), and a row decoded
    alone equals the same row in a batch, bit for bit."""
    heads, kv_heads, dim = 9, 3, 64
    k, v = _cache(rows=3, kv_heads=kv_heads, length=300, dim=dim, seed=1)
    k[0] = 0  # row 0: every score 0, the weights uniform
    k[1, :, 17] = 40  # row 1: key 17 far above the rest for a query of ones
    q = torch.ones(3, heads, dim).bfloat16()
    lens = torch.tensor([300, 300, 120])
    got = KERNEL(q, k, v, torch.tensor([0, 1, 2]), lens, dim ** -0.5)
    want = _reference(q, k, v, [0, 1, 2], lens.tolist(), dim ** -0.5)
    assert ((got.double() - want).abs() <= U_BF16 * want.abs() + 1e-5).all()
    assert torch.equal(got[1], v[1, torch.arange(heads) // 3, 17])  # e^-(40 * 8 - ...) is nothing beside 1
    for b in range(3):
        alone = KERNEL(q[b: b + 1], k, v, torch.tensor([b]), lens[b: b + 1], dim ** -0.5)
        assert torch.equal(alone[0], got[b])


def test_shapes_it_does_not_take():
    assert KERNEL.takes(9, 3, 64) and KERNEL.takes(32, 8, 128)
    assert not KERNEL.takes(34, 2, 64)  # 17 query heads a K/V head
    assert not KERNEL.takes(8, 8, 512) and not KERNEL.takes(9, 2, 64)
    k, v = _cache(rows=1, kv_heads=1, length=4, dim=64, seed=2)
    with pytest.raises(RuntimeError, match="length below 1"):
        KERNEL(_queries(1, 4, 1, 64, seed=3), k, v, torch.tensor([0]), torch.tensor([0]), 0.125)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the -march names are x86's")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_other_instruction_sets_compute_the_same(march):
    """The same source built for CPUs without AVX-512 (AVX2) and without AVX2 (SSE2 only) meets the same bound, so
    a machine this one is not gets the same attention."""
    kernel = DecodeAttentionKernel(build(ATTENTION_SOURCE, [f"-march={march}" if f == "-march=native" else f
                                                            for f in FLAGS]))
    k, v = _cache(rows=3, kv_heads=3, length=200, dim=64, seed=5)
    rows, lens = [2, 0], [200, 37]
    q = _queries(2, 9, 3, 64, seed=6)
    got = kernel(q, k, v, torch.tensor(rows), torch.tensor(lens), 0.125)
    want = _reference(q, k, v, rows, lens, 0.125)
    assert ((got.double() - want).abs() <= U_BF16 * want.abs() + 1e-5).all()
