"""Starts `npc serve` as a real process on a free loopback port: for tests and benchmarks over a real socket."""

from __future__ import annotations

import json
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
        command = [str(npc)] if npc.exists() else [sys.executable, "-m", "sidecar.cli"]  # not pip-installed
        self.proc = subprocess.Popen(
            [*command, "serve", "--listen", "127.0.0.1:0", "--characters", str(characters), "--log-format", "json",
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.log: list[str] = []
        self.openai_address: str | None = None  # HOST:PORT of --openai-listen, when the server was given it
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.address = self._wait_listening(timeout=120)

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("openai http on "):  # printed just before the gRPC line
                self.openai_address = line.split()[-1]
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

    def log_records(self, *levels: str) -> list[dict]:
        """The server's JSON log lines so far (only those at `levels`, e.g. "warning", "error", if given)."""
        records = []
        for line in list(self.log):
            try:
                record = json.loads(line)
            except ValueError:  # a traceback or anything else that is not a log record
                record = {"level": "error", "event": line.rstrip()}
            if isinstance(record, dict) and (not levels or record.get("level") in levels):
                records.append(record)
        return records


def serve_supports(flag: str) -> bool:
    """Whether this `npc serve` has a flag (benchmarks skip what the server cannot do yet)."""
    npc = Path(sys.executable).with_name("npc")
    run = subprocess.run([str(npc), "serve", "--help"], capture_output=True, text=True)
    return flag in run.stdout
