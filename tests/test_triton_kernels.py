"""The CUDA path's Triton kernels against slow float references: batched LoRA (BGMV) and decode attention.

Without CUDA they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before anything
imports them), so shapes stay small; on a GPU the same tests check the compiled kernels.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from sidecar.model.cuda import triton_available

if not triton_available():
    pytest.skip("triton is not importable (the dev extra installs it on Linux x86_64)", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the kernels cannot run", allow_module_level=True)

from sidecar.model.cuda.decode_attention import BLOCK_N, decode_attention  # noqa: E402
from sidecar.model.cuda.lora_triton import lora_bgmv_triton  # noqa: E402
from sidecar.model.lora import lora_bgmv  # noqa: E402

# fp32 arithmetic on these sizes (sums of at most a few hundred terms) stays well inside 1e-5 of the
# sum of the terms' magnitudes; measured errors are below 1e-7 of it.
FP32_REL = 1e-5


def one_rounding(v: torch.Tensor) -> torch.Tensor:
    """The most one rounding to v's dtype can have moved each value of v (a kernel's result).

    Half the spacing of the dtype there (round to nearest, as on the GPU); a whole spacing for bf16
    in Triton's interpreter, whose float32 -> bf16 cast truncates.
    """
    eps = torch.finfo(v.dtype).eps
    _, exponent = torch.frexp(v.double())  # |v| in [2^(e-1), 2^e); spacing there is eps * 2^(e-1)
    spacing = eps * torch.exp2(exponent.double() - 1)
    return spacing if v.dtype == torch.bfloat16 and INTERPRETED else spacing / 2


# --- batched LoRA -------------------------------------------------------------------------------------------


def lora_case(seed: int, slots: list[int], num_slots: int, rank: int, in_features: int, part_out: tuple[int, ...],
              dtype: torch.dtype, slot_dtype: torch.dtype = torch.int64):
    """Random inputs on DEVICE with x and y as strided views into bigger buffers."""
    gen = torch.Generator().manual_seed(seed)
    n, width, parts = len(slots), sum(part_out), len(part_out)
    x_buf = torch.randn(n, in_features + 7, generator=gen).to(dtype).to(DEVICE)
    y_buf = torch.randn(n, width + 13, generator=gen).to(dtype).to(DEVICE)
    A = (torch.randn(parts * num_slots * rank, in_features, generator=gen) * 0.2).to(dtype).to(DEVICE)
    Bs = [(torch.randn(num_slots * rank, out, generator=gen) * 0.2).to(dtype).to(DEVICE) for out in part_out]
    row_slot = torch.tensor(slots, dtype=slot_dtype, device=DEVICE)
    return x_buf, y_buf, A, Bs, row_slot


def lora_reference(y, x, A, Bs, slots, num_slots, rank, part_out):
    """The slow definition in float64 on the (already rounded) inputs: (new y, magnitude of its terms)."""
    want, mag = y.double().cpu().clone(), y.double().cpu().abs()
    x, A = x.double().cpu(), A.double().cpu()
    for n, s in enumerate(slots):
        if s < 0:
            continue
        lo = 0
        for j, out in enumerate(part_out):
            a = A[(j * num_slots + s) * rank:(j * num_slots + s + 1) * rank]  # [rank, in]
            b = Bs[j].double().cpu()[s * rank:(s + 1) * rank]  # [rank, out]
            want[n, lo:lo + out] += (x[n] @ a.T) @ b
            mag[n, lo:lo + out] += (x[n].abs() @ a.abs().T) @ b.abs()
            lo += out
    return want, mag


LORA_CASES = {
    # name: (slots per row, num_slots, rank, in, part_out)
    "qkv-gqa-repeated-and-base": ([0, -1, 3, 3, 1, -1, 2], 4, 5, 96, (64, 16, 16)),
    "single-part-distinct": ([3, 1, 0, 2], 4, 12, 64, (80,)),
    # rank 64: several K blocks and column blocks, each with a ragged tail
    "gate-up-rank64-tails": ([1, 0, 1], 2, 64, 300, (130, 70)),
    "one-row": ([2], 3, 1, 40, (24, 8)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_bgmv_against_loop(case, dtype):
    slots, num_slots, rank, in_features, part_out = LORA_CASES[case]
    width = sum(part_out)
    x_buf, y_buf, A, Bs, row_slot = lora_case(len(case), slots, num_slots, rank, in_features, part_out, dtype,
                                              torch.int32 if dtype == torch.float16 else torch.int64)
    x, y = x_buf[:, :in_features], y_buf[:, 8:8 + width]
    before = y_buf.clone()
    want, mag = lora_reference(y, x, A, Bs, slots, num_slots, rank, part_out)
    lora_bgmv_triton(y, x, A, Bs, row_slot, num_slots, rank, part_out)
    got = y.double().cpu()
    # y is rounded once from a float32 sum: one rounding of the result plus float32 error.
    err = (got - want).abs()
    bound = one_rounding(y.cpu()) + FP32_REL * mag
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g} at {(err - bound).argmax().item()}"
    # Base rows bit for bit, and nothing outside y's view written.
    base = torch.tensor([s < 0 for s in slots], device=DEVICE)
    assert torch.equal(y_buf[base], before[base])
    assert torch.equal(y_buf[:, :8], before[:, :8]) and torch.equal(y_buf[:, 8 + width:], before[:, 8 + width:])
    assert (got[~base.cpu()] != before[:, 8:8 + width][~base].double().cpu()).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_bgmv_agrees_with_masked_torch_op(dtype):
    """Same layouts (A rows (part, slot, r), B rows (slot, r)) as lora.lora_bgmv, given its slot mask."""
    slots, num_slots, rank, in_features, part_out = [2, -1, 0, 2, 1], 3, 6, 48, (32, 8, 8)
    x_buf, y_buf, A, Bs, row_slot = lora_case(7, slots, num_slots, rank, in_features, part_out, dtype)
    x, width = x_buf[:, :in_features], sum(part_out)
    mask = torch.zeros(len(slots), num_slots * rank, dtype=dtype, device=DEVICE)
    for n, s in enumerate(slots):
        if s >= 0:
            mask[n, s * rank:(s + 1) * rank] = 1
    ours, theirs = y_buf[:, :width].clone(), y_buf[:, :width].clone()
    lora_bgmv_triton(ours, x, A, Bs, row_slot, num_slots, rank, part_out)
    lora_bgmv(theirs, x, A, Bs, mask, part_out)
    _, mag = lora_reference(y_buf[:, :width], x, A, Bs, slots, num_slots, rank, part_out)
    # The torch op rounds t to bf16 and then y: two roundings of 2^-8 at most, on top of ours' one.
    rel = FP32_REL if dtype == torch.float32 else 3 * 2.0 ** -8
    assert ((ours.double().cpu() - theirs.double().cpu()).abs() <= rel * mag).all()
    assert not torch.equal(ours, y_buf[:, :width])


def test_lora_bgmv_all_base_rows_untouched():
    x_buf, y_buf, A, Bs, row_slot = lora_case(3, [-1, -1, -1], 2, 4, 32, (16, 16), torch.bfloat16)
    before = y_buf.clone()
    lora_bgmv_triton(y_buf[:, :32], x_buf[:, :32], A, Bs, row_slot, 2, 4, (16, 16))
    assert torch.equal(y_buf, before)


# --- decode attention ---------------------------------------------------------------------------------------

MAX_LEN = 160
# 0 (a padding row: zeros), 1, a non-multiple of BLOCK_N, exact multiples, near and at max_len.
SEQ_LENS = [1, 37, BLOCK_N, 2 * BLOCK_N, MAX_LEN - 1, MAX_LEN, 0]
GARBAGE = 3e4  # past a row's length: would swamp the softmax (and the output) if it were read


def attention_reference(q, k_cache, v_cache, seq_lens, scale):
    """Row by row in float32 with torch's SDPA on the first seq_lens[b] keys, KV heads expanded for GQA."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b, length in enumerate(seq_lens):
        if length == 0:
            continue
        k = k_cache[b, :, :length].float().cpu().repeat_interleave(heads // kv_heads, dim=0)  # [H, len, D]
        v = v_cache[b, :, :length].float().cpu().repeat_interleave(heads // kv_heads, dim=0)
        out[b] = F.scaled_dot_product_attention(q[b].float().cpu()[:, None], k, v, scale=scale)[:, 0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,dim", [(2, 2, 64), (8, 2, 64), (4, 1, 128)])
def test_decode_attention_against_sdpa(heads, kv_heads, dim, dtype):
    gen = torch.Generator().manual_seed(heads * dim)
    batch, rows, layers = len(SEQ_LENS), len(SEQ_LENS) + 2, 2
    # Whole cache garbage, then real keys/values in layer 1's first `batch` rows up to each length:
    # a wrong layer, row, head or length reads garbage.
    sign = lambda: torch.randint(0, 2, (layers, rows, kv_heads, MAX_LEN, dim), generator=gen) * 2 - 1  # noqa: E731
    k_all, v_all = (sign() * GARBAGE).float(), (sign() * GARBAGE).float()
    for b, length in enumerate(SEQ_LENS):
        k_all[1, b, :, :length] = torch.randn(kv_heads, length, dim, generator=gen)
        v_all[1, b, :, :length] = torch.randn(kv_heads, length, dim, generator=gen)
    k_cache, v_cache = k_all.to(dtype).to(DEVICE)[1], v_all.to(dtype).to(DEVICE)[1]
    # q as a strided view of a fused qkv output, as the model produces it
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, :heads * dim].unflatten(1, (heads, dim))
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32, device=DEVICE)
    scale = dim ** -0.5

    got = decode_attention(q, k_cache, v_cache, seq_lens, scale)
    assert got.dtype == dtype and got.shape == (batch, heads, dim)
    want = attention_reference(q, k_cache, v_cache, SEQ_LENS, scale)
    got = got.float().cpu()
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=FP32_REL, atol=FP32_REL)
    else:
        # One rounding of the output, plus the GPU's TF32 rounding of the probabilities in p @ v
        # (2^-11 of each weight, so at most 2^-11 * max |v| <= 2^-11 * 5 in all).
        bound = one_rounding(got.to(dtype)) + 2.0 ** -11 * 5 + 1e-5
        assert ((got.double() - want.double()).abs() <= bound).all(), (got - want).abs().max()
    assert torch.equal(got[SEQ_LENS.index(0)], torch.zeros(heads, dim))


def test_decode_attention_lengths_come_from_the_tensor():
    """One call per length vector with everything else fixed (what a captured graph replays)."""
    gen = torch.Generator().manual_seed(5)
    k_cache = torch.randn(2, 2, 96, 64, generator=gen).to(DEVICE)
    v_cache = torch.randn(2, 2, 96, 64, generator=gen).to(DEVICE)
    q = torch.randn(2, 4, 64, generator=gen).to(DEVICE)
    seq_lens = torch.tensor([3, 70], dtype=torch.int64, device=DEVICE)
    first = decode_attention(q, k_cache, v_cache, seq_lens, 0.125).cpu()
    seq_lens += 20  # in place, as a decode step advances a graph's input
    second = decode_attention(q, k_cache, v_cache, seq_lens, 0.125).cpu()
    torch.testing.assert_close(second, attention_reference(q, k_cache, v_cache, [23, 90], 0.125),
                               rtol=FP32_REL, atol=FP32_REL)
    assert not torch.allclose(first, second)
