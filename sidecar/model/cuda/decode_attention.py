"""Decode attention on the CUDA path: one new query token per row over a static KV cache, as a Triton kernel.

Each row attends to its first seq_lens[b] cached keys. The loop bound is read from seq_lens on the
device, so one captured CUDA graph serves every decode step whatever the lengths (no host syncs,
no data-dependent allocation). Grid (B, KVH): a program takes every query head of one KV head
(GQA group), so each K/V block is loaded once per group, and the group's scores are one tl.dot with
the group padded to 16 rows (tl.dot's minimum). Softmax is online (running max and sum) in float32.
One program walks a row's whole length (no split over the keys), so at batch 1 only KVH programs run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the cheap instruction
BLOCK_N = 64  # keys per loop iteration


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lens_ptr, qk_scale, max_len,
                   q_sb, q_sh, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh,
                   GROUP: tl.constexpr, G_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    g = tl.arange(0, G_BLOCK)
    d = tl.arange(0, HEAD_DIM)
    j = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + g
    in_group = g < GROUP
    # Dot operands are float32: exact for bf16/fp16 values even in TF32, and Triton's interpreter
    # (the CPU tests) multiplies bf16 tl.dot operands as their raw 16-bit patterns.
    q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + d[None, :], mask=in_group[:, None], other=0.0)
    q = q.to(tl.float32)
    # Clamped to the cache so a bad length cannot read past it.
    seq_len = tl.minimum(tl.load(lens_ptr + b), max_len)
    k_row = k_ptr + b * k_sb + kvh * k_sh
    v_row = v_ptr + b * v_sb + kvh * v_sh
    m_i = tl.full([G_BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_BLOCK], dtype=tl.float32)
    acc = tl.zeros([G_BLOCK, HEAD_DIM], dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        pos = start + j
        live = pos < seq_len
        # Masked loads: cache slots past the row's length (stale or garbage) are never read.
        k = tl.load(k_row + pos[:, None] * k_sn + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G_BLOCK, BLOCK_N], log2 units
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every iteration has at least one live key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_row + pos[:, None] * v_sn + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    # A row of length 0 (a padding row of a captured batch) gets zeros, not 0/0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + b * o_sb + heads[:, None] * o_sh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=in_group[:, None])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(q . K[:len] * scale) @ V[:len] for each row and head; returns a new [B, H, D] in q's dtype.

    q [B, H, D] (RoPE applied). k_cache / v_cache [rows >= B, KVH, max_len, D], any strides but a
    contiguous last dim (one layer's view of a bigger cache); batch row b reads cache row b, query
    head h reads KV head h // (H // KVH). seq_lens [B] int32 or int64 on q's device: row b attends
    to positions 0 .. seq_lens[b] - 1 (a length of 0 gives zeros; one past max_len is clamped).
    D must be a power of two >= 16 (64 and 128 in practice).
    """
    batch, heads, dim = q.shape
    rows, kv_heads, max_len, kdim = k_cache.shape
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache and v_cache must share one of {_DTYPES}, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    if v_cache.shape != k_cache.shape or kdim != dim or rows < batch or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}: "
                         "expected caches [rows >= B, KVH, max_len, D] with H a multiple of KVH")
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"head dim {dim} must be a power of two >= 16")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dim")
    if seq_lens.shape != (batch,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} {seq_lens.dtype}: expected [{batch}] int32 or int64")
    if any(t.device != q.device for t in (k_cache, v_cache, seq_lens)):
        raise ValueError(f"k_cache, v_cache and seq_lens must be on q's device {q.device}")
    out = torch.empty((batch, heads, dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = heads // kv_heads
    # tl.dot's operands need 16 rows at least; the padding rows load zeros and are never stored.
    g_block = max(16, triton.next_power_of_2(group))
    # The dots take float32 operands. TF32 (10-bit mantissa) holds bf16 and fp16 values exactly, so
    # 16-bit caches use TF32 tensor cores losing only p's low bits; an fp32 model gets full fp32 dots.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, out, seq_lens, scale * _LOG2E, max_len,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        GROUP=group, G_BLOCK=g_block, HEAD_DIM=dim, BLOCK_N=BLOCK_N, PRECISION=precision,
        num_stages=2)  # float32 K/V tiles: 3 pipeline stages at head dim 128 can outgrow a consumer GPU's shared memory
    return out

