"""The `npc serve` process that `npc bench --scenario load / faults` measures, on a free loopback port.

Its JSON log goes to a file beside the benchmark's copy of the characters (nothing has to read it
while the server runs); the scenarios count its warnings and errors at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BenchServer:
    proc: subprocess.Popen
    address: str  # HOST:PORT it listens on
    log_path: Path

    @classmethod
    def start(cls, characters: Path, log_path: Path, *args: str) -> BenchServer:
        npc = Path(sys.executable).with_name("npc")
        command = [str(npc)] if npc.exists() else [sys.executable, "-m", "sidecar.cli"]  # not pip-installed
        with open(log_path, "a") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen([*command, "serve", "--listen", "127.0.0.1:0", "--characters", str(characters),
                                     "--log-format", "json", *args], stdout=subprocess.PIPE, stderr=log, text=True)
        for line in proc.stdout:  # "listening on HOST:PORT" once it serves; EOF if it exits first
            if line.startswith("listening on "):
                return cls(proc, line.split()[-1], log_path)
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"npc serve did not start (exit {proc.wait()}):\n{tail}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (the server drains its replies for --grace), SIGKILL after `timeout` s; the exit code."""
        self.proc.terminate()  # nothing happens if it has already exited
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_records(self, *levels: str) -> list[dict]:
        """Its log lines (those at `levels` if given); a line that is not JSON, such as a traceback, is an error."""
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        records = [_record(line) for line in lines if line.strip()]
        return [r for r in records if not levels or r.get("level") in levels]


def _record(line: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError:
        return {"level": "error", "event": line}
    return record if isinstance(record, dict) else {"level": "error", "event": line}
