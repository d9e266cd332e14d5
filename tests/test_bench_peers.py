"""A peer that crashes is a failed row of a benchmark, never a dead benchmark (issue 17): the decode
scenario runs llama.cpp through bench.decode.run_isolated, in a process of its own."""

from __future__ import annotations

import ctypes

from sidecar.bench.decode import run_isolated


def _segfault() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV, as the AMX build of llama.cpp did


def _fails() -> None:
    raise RuntimeError("no such model file")


def _works(x: int) -> int:
    return x * 2


def test_a_crashing_peer_is_a_failed_row():
    assert run_isolated(_segfault) == (None, "its process died (a crash in native code)")
    assert run_isolated(_fails) == (None, "RuntimeError: no such model file")
    assert run_isolated(_works, 21) == (42, "")  # and this process is still here to say so
