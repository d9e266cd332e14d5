"""Small C kernels for what eager PyTorch on CPU cannot do well, built on first use.

- bgmv.c: each decode row's own LoRA delta, read where its adapter lies (model/lora.py).
- attention.c: decode attention, each row's query against its own keys and values in the K/V cache
  (model/llama.py).
- rms_norm.c: RMSNorm of bf16 rows in one pass (model/llama.py).
- quant_gemm.c: 4-bit groups (GGUF's Q4 blocks, float32 scales) and Q4_K / Q6_K / Q8_0 blocks as stored times bf16
  activations through integer dot products, as llama.cpp does (model/quant.py: NativeInt4Linear,
  BlockLinear).

Each C source is compiled with the system C compiler (`cc`, gcc or clang) into a shared library
cached under ~/.cache/npc-sidecar (or $NPC_CACHE_DIR), keyed by the source and the flags, and
called through ctypes: no torch headers, so a build takes about a second. Without a compiler,
`bgmv_kernel()` / `quant_gemm_kernel()` / `decode_attention_kernel()` / `rms_norm_kernel()` return None and
callers use their PyTorch path; $NPC_NO_NATIVE=1 forces that.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import structlog
import torch

log = structlog.get_logger(__name__)

SOURCE = Path(__file__).with_name("bgmv.c")
QUANT_GEMM_SOURCE = Path(__file__).with_name("quant_gemm.c")
ATTENTION_SOURCE = Path(__file__).with_name("attention.c")
RMS_NORM_SOURCE = Path(__file__).with_name("rms_norm.c")
# The GGUF block kinds quant_gemm.c reads as stored: (bytes, values) of a block.
BLOCK_BYTES = {"Q4_K": (144, 256), "Q6_K": (210, 256), "Q8_0": (34, 32)}
# -march=native: the library is built on the machine that runs it. The three math flags let the
# compiler vectorize float sums (reassociation) without -ffast-math's process-wide FTZ switch.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math"]

_lock = threading.Lock()
_loaded: dict[str, object] = {}  # kernel name -> its wrapper, or None where it did not build


def cache_dir() -> Path:
    return Path(os.environ.get("NPC_CACHE_DIR") or Path.home() / ".cache" / "npc-sidecar")


def build(source: Path = SOURCE, flags: list[str] = FLAGS) -> Path:
    """Compiles `source` (once per source + flags) and returns the shared library's path. Tests pass other
    `-march` flags to check the AVX2 and scalar paths on a CPU that would build the VNNI one."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # + headers
    key = hashlib.sha256(text + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *flags, str(source), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders never load a half-written file
    return target


class BgmvKernel:
    """ctypes wrapper of lora_bgmv_bf16 (semantics in bgmv.c and model/lora.lora_bgmv)."""

    def __init__(self, library: Path):
        self._lib = ctypes.CDLL(str(library))
        fn = self._lib.lora_bgmv_bf16
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [i64, i64, ptr, i64, ptr, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr]
        fn.restype = ctypes.c_int
        self._fn = fn

    def __call__(self, y: torch.Tensor, x: torch.Tensor, row_slot: torch.Tensor, num_slots: int,
                 a: ctypes.Array, first: ctypes.Array, rank: ctypes.Array, b: ctypes.Array,
                 part_out: ctypes.Array) -> bool:
        """y [N, out] += delta (in place). a: the slots' stacked-A pointers [S]; first, rank, b: per (slot, part)
        [S * parts]. False when the kernel declined (sizes beyond its limits)."""
        assert x.dtype == y.dtype == torch.bfloat16 and row_slot.dtype == torch.int64
        assert x.stride(1) == 1 and y.stride(1) == 1
        assert x.shape[0] == y.shape[0] == row_slot.numel(), "one slot index per row"
        rc = self._fn(x.shape[0], x.shape[1], x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
                      row_slot.data_ptr(), num_slots, len(part_out), a, first, rank, b, part_out)
        return rc == 0


class QuantGemmKernel:
    """ctypes wrapper of quant_gemm.c's int4_gemm and its GGUF-block kernels (semantics there)."""

    def __init__(self, library: Path):
        self._lib = ctypes.CDLL(str(library))
        isa = self._lib.quant_gemm_isa
        isa.restype = ctypes.c_char_p
        self.isa = isa().decode()  # "avx512-vnni", "avx-vnni", "avx2" or "scalar": what -march=native gave
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self._int4 = self._lib.int4_gemm
        self._int4.argtypes = [i64, i64, i64, ptr, i64, c_int, ptr, ptr, ptr, ptr, i64, c_int]
        self._blocks = {kind: getattr(self._lib, f"{kind.lower()}_gemm") for kind in BLOCK_BYTES}
        for fn in self._blocks.values():
            fn.argtypes = [i64, i64, i64, ptr, i64, c_int, ptr, ptr, i64, c_int]
            fn.restype = c_int
        self._int4.restype = c_int

    @staticmethod
    def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
        assert x.dim() == 2 and x.stride(1) == 1 and x.dtype in (torch.bfloat16, torch.float32)
        return x, int(x.dtype == torch.bfloat16)

    @staticmethod
    def int4_weights(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> tuple[int, int, int, int, int]:
        """(N, K, pointers) of a 4-bit matrix, checked once: a decode step multiplies ~100 matrices, each call
        of `run_int4` then costs microseconds of Python less."""
        n, k = codes.shape[0], codes.shape[1] * 2
        assert codes.dtype == torch.uint8 and scale.dtype == low.dtype == torch.float32
        assert codes.is_contiguous() and scale.is_contiguous() and low.is_contiguous()
        assert scale.shape == low.shape == (n, k // 32)
        return n, k, codes.data_ptr(), scale.data_ptr(), low.data_ptr()

    def run_int4(self, x: torch.Tensor, weights: tuple[int, int, int, int, int]) -> torch.Tensor:
        """x [M, K] (bf16 or float32, unit column stride) @ W.T -> [M, N] in x's dtype; W from `int4_weights`
        (its tensors must outlive the call)."""
        x, bf16 = self._rows(x)
        n, k, codes, scale, low = weights
        assert x.shape[1] == k
        y = x.new_empty(x.shape[0], n)
        if self._int4(x.shape[0], k, n, x.data_ptr(), x.stride(0), bf16, codes, scale, low, y.data_ptr(), n, bf16):
            raise RuntimeError(f"int4_gemm failed on x {tuple(x.shape)}, W [{n}, {k}] (scratch memory)")
        return y

    def int4(self, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ W.T -> [M, N] in x's dtype; W's 4-bit groups (semantics in quant_gemm.c)."""
        return self.run_int4(x, self.int4_weights(codes, scale, low))

    def blocks(self, kind: str, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ W.T -> [M, N] in x's dtype; W as GGUF blocks of `kind` (BLOCK_BYTES), uint8 [N, bytes a row]."""
        x, bf16 = self._rows(x)
        assert blocks.dtype == torch.uint8 and blocks.is_contiguous()
        rows, k = x.shape
        n = blocks.shape[0]
        size, values = BLOCK_BYTES[kind]
        assert k % values == 0 and blocks.shape[1] == k // values * size
        y = x.new_empty(rows, n)
        rc = self._blocks[kind](rows, k, n, x.data_ptr(), x.stride(0), bf16, blocks.data_ptr(), y.data_ptr(),
                                y.stride(0), bf16)
        if rc != 0:
            raise RuntimeError(f"{kind} gemm failed on x {tuple(x.shape)}, W [{n}, {k}] (scratch memory)")
        return y


class DecodeAttentionKernel:
    """ctypes wrapper of decode_attention_bf16 (semantics in attention.c)."""

    def __init__(self, library: Path):
        self._lib = ctypes.CDLL(str(library))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fn = self._lib.decode_attention_bf16
        self._fn.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ctypes.c_float, ptr]
        self._fn.restype = ctypes.c_int
        self._takes = self._lib.decode_attention_takes
        self._takes.argtypes = [i64, i64, i64]
        self._takes.restype = ctypes.c_int

    def takes(self, heads: int, kv_heads: int, head_dim: int) -> bool:
        """Whether the kernel takes this attention shape (GQA groups up to 16 heads, head dims up to 256)."""
        return bool(self._takes(heads, kv_heads, head_dim))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """q [B, H, D] (unit stride along H's heads and D); k, v: the cache [rows, KVH, S, D] (same strides);
        rows, lens: int64 [B], each row's cache row and its keys (>= 1). Returns [B, H, D] bf16."""
        batch, heads, dim = q.shape
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and rows.dtype == lens.dtype == torch.int64
        assert q.stride(2) == 1 and q.stride(1) == dim and k.stride() == v.stride() and k.stride(2) == dim
        assert k.stride(3) == 1 and rows.is_contiguous() and lens.is_contiguous() and len(rows) == len(lens) == batch
        out = q.new_empty(batch, heads, dim)
        rc = self._fn(batch, heads, k.shape[1], dim, q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(),
                      k.stride(0), k.stride(1), rows.data_ptr(), lens.data_ptr(), scale, out.data_ptr())
        if rc != 0:
            raise RuntimeError(f"decode attention failed on q {tuple(q.shape)}, cache {tuple(k.shape)} (a shape it "
                               "does not take, a length below 1, or scratch memory)")
        return out


class RmsNormKernel:
    """ctypes wrapper of rms_norm_bf16 (semantics in rms_norm.c)."""

    def __init__(self, library: Path):
        self._lib = ctypes.CDLL(str(library))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fn = self._lib.rms_norm_bf16
        self._fn.argtypes = [i64, i64, ptr, i64, ptr, ctypes.c_float, ptr]
        self._fn.restype = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dimension of bf16 x (rows of unit stride) with a bf16 weight; a new tensor."""
        hidden = x.shape[-1]
        rows = x.reshape(-1, hidden)
        assert x.dtype == weight.dtype == torch.bfloat16 and rows.stride(1) == 1 and weight.is_contiguous()
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        self._fn(rows.shape[0], hidden, rows.data_ptr(), rows.stride(0), weight.data_ptr(), eps, out.data_ptr())
        return out


def _load(name: str, source: Path, wrapper: type) -> object:
    if os.environ.get("NPC_NO_NATIVE") == "1":
        return None
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = wrapper(build(source))
            except (RuntimeError, OSError) as exc:
                log.warning("native kernel unavailable; using the PyTorch path", kernel=name, reason=str(exc))
                _loaded[name] = None
        return _loaded[name]


def bgmv_kernel() -> BgmvKernel | None:
    """The compiled BGMV kernel, or None (no compiler, build failure, or NPC_NO_NATIVE=1)."""
    return _load("bgmv", SOURCE, BgmvKernel)


def quant_gemm_kernel() -> QuantGemmKernel | None:
    """The compiled quantized-matmul kernels where they have a vector path (AVX2 or VNNI), else None (also
    without a compiler, or with NPC_NO_NATIVE=1): a scalar build would be slower than torch's kernels."""
    kernel = _load("quant_gemm", QUANT_GEMM_SOURCE, QuantGemmKernel)
    return kernel if kernel is not None and kernel.isa != "scalar" else None


def decode_attention_kernel() -> DecodeAttentionKernel | None:
    """The compiled decode-attention kernel, or None (no compiler, build failure, or NPC_NO_NATIVE=1)."""
    return _load("attention", ATTENTION_SOURCE, DecodeAttentionKernel)


def rms_norm_kernel() -> RmsNormKernel | None:
    """The compiled RMSNorm kernel, or None (no compiler, build failure, or NPC_NO_NATIVE=1)."""
    return _load("rms_norm", RMS_NORM_SOURCE, RmsNormKernel)
