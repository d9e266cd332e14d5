"""Triton kernels for the CUDA path (batched LoRA, decode attention).

They compile for a CUDA GPU. On a CPU they run only in Triton's interpreter (TRITON_INTERPRET=1,
set before the kernel modules are imported), which is how the tests check them without a GPU.
The kernel modules import triton at the top: check `triton_available()` before importing them.
"""

from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    """True when `import triton` works (asked once per process)."""
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install can raise more than ImportError; either way there is no Triton
        return False
    return True
