"""Test helpers: a real `npc serve` process on a free loopback port, and character folders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

__all__ = ["REPO", "SidecarProcess", "copy_characters", "write_character"]


def copy_characters(dest: Path, ids: tuple[str, ...] = ("blacksmith", "oracle")) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for cid in ids:
        shutil.copytree(REPO / "characters" / cid, dest / cid)
    return dest


def write_character(root: Path, cid: str, persona: str, adapter: str | None = None, **extra: str) -> Path:
    folder = root / cid
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"id: {cid}", f"name: {cid.title()}", f"persona: {persona!r}"]
    if adapter:
        lines.append(f"adapter: {adapter}")
    lines += [f"{k}: {v}" for k, v in extra.items()]
    (folder / "character.yaml").write_text("\n".join(lines) + "\n")
    return folder


class SidecarProcess:
    """`npc serve` on 127.0.0.1:0 with JSON logs; `address` once it listens, its stderr lines in `log`."""

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
