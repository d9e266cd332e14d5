"""Batched LoRA for decode on the CUDA path (BGMV: every row its own adapter), as two Triton kernels.

Same semantics as sidecar.model.lora.lora_bgmv, but each row reads only its own slot's A and B rows
instead of a masked product over every resident slot, so the cost does not grow with the number of
slots. Shrink: t = x @ A_s.T per (row, part), kept in float32; expand: y[:, part] += t @ B_s, with y
rounded once. No host syncs and no data-dependent allocation, so a CUDA graph can capture a call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Register tile of one program: R_BLOCK x (K or OUT) float32 values; these keep it near 8K elements.
_SHRINK_TILE = 8192
_EXPAND_TILE = 4096


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, t_ptr, slot_ptr, in_features, x_stride, a_stride, num_slots, rank,
                   R_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr):
    """t[n, part, :rank] = x[n] @ A[part, slot[n]].T in float32 (zeros past rank and for base rows)."""
    n = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    r = tl.arange(0, R_BLOCK)
    k = tl.arange(0, K_BLOCK)
    a_rows = (part * num_slots + slot) * rank + r
    acc = tl.zeros([R_BLOCK], dtype=tl.float32)
    # A base-model row (or a slot out of range) runs no iteration: it reads nothing out of bounds.
    k_end = tl.where((slot >= 0) & (slot < num_slots), in_features, 0)
    for k0 in range(0, k_end, K_BLOCK):
        kk = k0 + k
        k_in = kk < in_features
        xv = tl.load(x_ptr + n * x_stride + kk, mask=k_in, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + a_rows[:, None] * a_stride + kk[None, :],
                     mask=(r[:, None] < rank) & k_in[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(av * xv[None, :], axis=1)
    tl.store(t_ptr + (n * parts + part) * R_BLOCK + r, acc)


@triton.jit
def _expand_kernel(y_ptr, t_ptr, b_ptr, slot_ptr, out_features, y_col, y_stride, b_stride, part, parts, num_slots,
                   rank, R_BLOCK: tl.constexpr, OUT_BLOCK: tl.constexpr):
    """y[n, y_col + c] += t[n, part] @ B[slot[n]][:, c] for one block of columns c; base rows untouched."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * OUT_BLOCK + tl.arange(0, OUT_BLOCK)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    r = tl.arange(0, R_BLOCK)
    # Masking the store (not writing y back unchanged) leaves base rows bit-for-bit as they were.
    cols = (c < out_features) & (slot >= 0) & (slot < num_slots)
    tv = tl.load(t_ptr + (n * parts + part) * R_BLOCK + r)
    bv = tl.load(b_ptr + (slot * rank + r)[:, None] * b_stride + c[None, :],
                 mask=(r[:, None] < rank) & cols[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(tv[:, None] * bv, axis=0)
    y_at = y_ptr + n * y_stride + y_col + c
    yv = tl.load(y_at, mask=cols, other=0.0).to(tl.float32)
    tl.store(y_at, (yv + delta).to(y_ptr.dtype.element_ty), mask=cols)


def lora_bgmv_triton(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bs: Sequence[torch.Tensor],
                     row_slot: torch.Tensor, num_slots: int, rank: int, part_out: tuple[int, ...]) -> None:
    """Decode LoRA, every row with its own adapter, in place on y (semantics of lora.lora_bgmv).

    x [N, in] and y [N, sum(part_out)] may be row-strided views (last dim contiguous), same dtype
    (bf16, fp16 or fp32). A [parts * num_slots * rank, in], rows (part, slot, r); Bs[j]
    [num_slots * rank, out_j], rows (slot, r), scale folded in; both contiguous. row_slot [N] int32
    or int64 on x's device, -1 = base model (row untouched; so is a slot >= num_slots, which the
    caller must not pass). For each row n with slot s and each part j:
        y[n, lo_j:lo_j + out_j] += (x[n] @ A_j[s].T) @ B_j[s]
    with the shrink kept in float32 and y rounded once.
    """
    n, in_features = x.shape
    parts = len(part_out)
    width = sum(part_out)
    if x.dtype not in _DTYPES or y.dtype != x.dtype:
        raise TypeError(f"x and y must share one of {_DTYPES}, got {x.dtype} and {y.dtype}")
    if y.shape != (n, width) or x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)}: expected y [N, {width}], last dims contiguous")
    if A.shape != (parts * num_slots * rank, in_features) or not A.is_contiguous():
        raise ValueError(f"A {tuple(A.shape)}: expected contiguous [{parts} * {num_slots} * {rank}, {in_features}]")
    if len(Bs) != parts or any(b.shape != (num_slots * rank, out) or not b.is_contiguous()
                               for b, out in zip(Bs, part_out, strict=True)):
        raise ValueError(f"Bs {[tuple(b.shape) for b in Bs]}: expected contiguous [{num_slots} * {rank}, out_j] "
                         f"for part_out {part_out}")
    if row_slot.shape != (n,) or row_slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"row_slot {tuple(row_slot.shape)} {row_slot.dtype}: expected [{n}] int32 or int64")
    if any(t.device != x.device for t in (y, A, row_slot, *Bs)):
        raise ValueError(f"y, A, Bs and row_slot must be on x's device {x.device}")
    if n == 0 or rank == 0:
        return
    r_block = max(16, triton.next_power_of_2(rank))
    k_block = min(512, _SHRINK_TILE // r_block, triton.next_power_of_2(in_features))
    out_block = max(64, _EXPAND_TILE // r_block)
    # Padded to r_block so both kernels index it with constexpr strides; a fixed shape per call.
    t = torch.empty((n, parts, r_block), dtype=torch.float32, device=x.device)
    _shrink_kernel[(n, parts)](x, A, t, row_slot, in_features, x.stride(0), A.stride(0), num_slots, rank,
                               R_BLOCK=r_block, K_BLOCK=k_block)
    lo = 0
    for j, out in enumerate(part_out):
        _expand_kernel[(n, triton.cdiv(out, out_block))](y, t, Bs[j], row_slot, out, lo, y.stride(0), Bs[j].stride(0),
                                                         j, parts, num_slots, rank, R_BLOCK=r_block,
                                                         OUT_BLOCK=out_block)
        lo += out
