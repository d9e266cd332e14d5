"""Starts `npc serve` as a real process on a free loopback port: for tests and benchmarks over a real socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class SidecarProcess:
    def __init__(self, characters: Path, *args: str, env: dict[str, str] | None = None):
        self.characters = characters
        npc = Path(sys.executable).with_name("npc")
        self.proc = subprocess.Popen(
            [str(npc), "serve", "--listen", "127.0.0.1:0", "--characters", str(characters), "--log-format", "json",
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.log: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.address = self._wait_listening(timeout=120)

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("listening on "):
                return line.split()[-1]
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError("npc serve did not start:\n" + "".join(self.log[-30:]))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    @property
    def pid(self) -> int:
        return self.proc.pid
