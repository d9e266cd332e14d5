"""Small C kernels for what eager PyTorch on CPU cannot do well, built on first use.

The C source is compiled with the system C compiler (`cc`, gcc or clang) into a shared library
cached under ~/.cache/npc-sidecar (or $NPC_CACHE_DIR), keyed by the source and the flags, and
called through ctypes: no torch headers, so a build takes about a second. Without a compiler,
`bgmv_kernel()` returns None and callers use their PyTorch path; $NPC_NO_NATIVE=1 forces that.
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
# -march=native: the library is built on the machine that runs it. The three math flags let the
# compiler vectorize float sums (reassociation) without -ffast-math's process-wide FTZ switch.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math"]

_lock = threading.Lock()
_loaded: dict[str, BgmvKernel | None] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("NPC_CACHE_DIR") or Path.home() / ".cache" / "npc-sidecar")


def build(source: Path = SOURCE) -> Path:
    """Compiles `source` (once per source + flags) and returns the shared library's path."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *FLAGS, str(source), "-o", str(out)], capture_output=True, text=True)
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


def bgmv_kernel() -> BgmvKernel | None:
    """The compiled BGMV kernel, or None (no compiler, build failure, or NPC_NO_NATIVE=1)."""
    if os.environ.get("NPC_NO_NATIVE") == "1":
        return None
    with _lock:
        if "bgmv" not in _loaded:
            try:
                _loaded["bgmv"] = BgmvKernel(build())
            except (RuntimeError, OSError) as exc:
                log.warning("native LoRA kernel unavailable; using the PyTorch path", reason=str(exc))
                _loaded["bgmv"] = None
        return _loaded["bgmv"]
