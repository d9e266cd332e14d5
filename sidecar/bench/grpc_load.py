"""What the gRPC benches (`--scenario load` and `--scenario faults`) share: a client that talks
like a game and records what it saw, a monitor of the server's memory and queue, and summaries.

Everything is measured on the client side of a real socket: a latency here includes gRPC and the
client's own event loop, which is what a game would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from sidecar.bench.timing import _percentile as percentile
from sidecar.client import NpcClient
from sidecar.pb.npc.v1 import dialogue_pb2 as pb

__all__ = ["PLAYER_LINES", "ServerMonitor", "TalkRecord", "client_loop", "copy_characters", "latency_summary",
           "optional_flags", "percentile", "rss_mb", "status_counts", "talk", "wait_idle"]

# What players type: greetings, trade, quests, lore, small talk, a few odd ones. Varied lengths so
# prompts (and prefix-cache hits) vary the way they do in a game.
PLAYER_LINES = [
    "Hello there.",
    "Who are you?",
    "What do you sell?",
    "How much for a sword?",
    "Can you repair my armour? The left pauldron is cracked.",
    "Have you heard any rumours lately?",
    "Where can I find the Greyvein mine?",
    "Is the north road safe to travel at night?",
    "I'm looking for work. Anything that pays?",
    "Tell me about yourself.",
    "What happened to the mine?",
    "Do you know Torvik, the tavern keeper?",
    "I need a place to stay tonight.",
    "What's the weather going to be like tomorrow?",
    "Can you tell my fortune?",
    "I found this strange amulet in the marsh. Do you know what it is?",
    "Any ships leaving Saltmere soon?",
    "How do I get to Highmoor from here?",
    "I'm short on coin. Can we make a deal?",
    "Thanks for your help.",
    "Why are you so grumpy?",
    "What do you think of the lords in the capital?",
    "Have you seen a hooded stranger pass through here?",
    "I killed the wolves that were attacking the farms east of town.",
    "Could you teach me something?",
    "What's the best thing you've ever made?",
    "Goodbye, friend.",
    "Is there anything you need help with?",
    "Tell me a story from your past, something you never told anyone.",
    "Why should I trust you?",
]


@dataclass
class TalkRecord:
    """One Talk call as the client saw it. Times are time.perf_counter() seconds."""

    character: str
    player_line: str
    session_id: str
    started_at: float
    ended_at: float = 0.0
    status: str = "OK"  # the gRPC status code's name; "OK" when the stream ended normally
    message: str = ""  # the status details when not OK
    version: str = ""  # Started.character_version
    prompt_tokens: int = 0  # Started.prompt_tokens
    history_turns: int = 0  # Started.history_turns: how much of the session the prompt carried
    ttft_ms: float | None = None  # call made -> first delta
    gaps_ms: list[float] = field(default_factory=list)  # between consecutive deltas (inter-token latency)
    deltas: int = 0
    completion_tokens: int = 0
    finish: str = ""  # STOP, LENGTH or CANCELLED from Finished; "" when no Finished came
    text: str = ""
    cancelled_by_client: bool = False
    problem: str = ""  # a broken stream contract (e.g. OK without Finished), which is a server bug

    @property
    def ok(self) -> bool:
        """A reply the player got in full: the only kind that enters a session."""
        return self.status == "OK" and self.finish in ("STOP", "LENGTH") and not self.problem

    @property
    def outcome(self) -> str:
        """One word for tables: OK, the status code, FINISH_CANCELLED or the contract problem."""
        if self.problem:
            return "PROTOCOL_ERROR"
        if self.status != "OK":
            return self.status
        return "OK" if self.finish in ("STOP", "LENGTH") else f"FINISH_{self.finish or 'NONE'}"


async def talk(client: NpcClient, character: str, line: str, session_id: str = "",
               options: pb.GenerationOptions | None = None, timeout: float | None = None,
               cancel_after: int | None = None) -> TalkRecord:
    """One Talk, read to the end. `cancel_after=k` cancels the call once k deltas arrived (0: right
    after Started), the way a player walking away does. Cancelling the task running this cancels the call."""
    record = TalkRecord(character, line, session_id, time.perf_counter())
    call = client.talk(character, line, session_id=session_id, options=options, timeout=timeout)
    last = None
    try:
        async for event in call:
            now = time.perf_counter()
            kind = event.WhichOneof("event")
            if kind == "started":
                record.version = event.started.character_version
                record.prompt_tokens = event.started.prompt_tokens
                record.history_turns = event.started.history_turns
            elif kind == "delta":
                if last is None:
                    record.ttft_ms = (now - record.started_at) * 1000
                else:
                    record.gaps_ms.append((now - last) * 1000)
                last = now
                record.deltas += 1
                record.text += event.delta.text
            elif kind == "finished":
                f = event.finished
                record.finish = pb.FinishReason.Name(f.reason).removeprefix("FINISH_REASON_")
                record.completion_tokens = f.usage.completion_tokens
                if f.full_text != record.text:
                    record.problem = "Finished.full_text differs from the concatenated deltas"
            if cancel_after is not None and kind != "finished" and record.deltas >= cancel_after:
                call.cancel()
                record.status, record.cancelled_by_client = "CANCELLED", True
                break
        else:
            if not record.finish:
                record.problem = "the stream ended with OK but without Finished"
    except grpc.aio.AioRpcError as e:
        record.status, record.message = e.code().name, e.details() or ""
    finally:
        record.ended_at = time.perf_counter()
        if not record.finish and not record.cancelled_by_client and record.status == "OK":
            call.cancel()  # the task was cancelled mid-read: do not leave the call running
    return record


async def client_loop(client: NpcClient, characters: list[str], stop: asyncio.Event, records: list[TalkRecord],
                      rng: random.Random, session_id: str = "", session_share: float = 0.5,
                      options: pb.GenerationOptions | None = None, timeout: float | None = None) -> None:
    """A player talking to NPCs back to back until `stop`: a character and a line at random, and with
    probability `session_share` the player's session, so that history grows."""
    while not stop.is_set():
        sid = session_id if session_id and rng.random() < session_share else ""
        record = await talk(client, rng.choice(characters), rng.choice(PLAYER_LINES), sid, options, timeout)
        records.append(record)
        if record.status in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
            await asyncio.sleep(0.1 + 0.1 * rng.random())  # the proto asks for a short backoff, not a hot retry


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process (VmRSS), in MB; None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class Sample:
    t: float  # seconds since the monitor's t0
    rss_mb: float | None
    active: int | None  # ServerInfo.active_sequences; None when the call failed
    waiting: int | None
    prefix_cache_mb: float | None = None  # ServerInfo.prefix_cache_bytes: fills up to its capacity by design


class ServerMonitor:
    """Samples the server's RSS and queue (GetServerInfo) every `interval` s, on its own channel."""

    def __init__(self, address: str, pid: int, t0: float, interval: float = 1.0):
        self.client, self.pid, self.t0, self.interval = NpcClient(address, timeout=2.0), pid, t0, interval
        self.samples: list[Sample] = []
        self._task: asyncio.Task | None = None

    async def sample(self) -> Sample:
        try:
            info = await self.client.server_info()
            active, waiting = info.active_sequences, info.waiting_requests
            prefix = round(info.prefix_cache_bytes / 2**20, 1)
        except grpc.aio.AioRpcError:
            active = waiting = prefix = None
        s = Sample(round(time.perf_counter() - self.t0, 2), rss_mb(self.pid), active, waiting, prefix)
        self.samples.append(s)
        return s

    async def _run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.close()

    def rss_between(self, start: float, end: float, what: str = "rss_mb") -> float | None:
        """Median RSS (or another Sample field) of the samples in [start, end] s since t0: steadier than one."""
        values = [getattr(s, what) for s in self.samples if start <= s.t <= end and getattr(s, what) is not None]
        return round(percentile(values, 0.5), 1) if values else None

    def series(self) -> dict[str, list]:
        return {"t_s": [s.t for s in self.samples], "rss_mb": [s.rss_mb for s in self.samples],
                "active_sequences": [s.active for s in self.samples],
                "waiting_requests": [s.waiting for s in self.samples],
                "prefix_cache_mb": [s.prefix_cache_mb for s in self.samples]}


async def wait_idle(client: NpcClient, timeout: float) -> tuple[float | None, pb.ServerInfo | None]:
    """Polls GetServerInfo until no reply is running or waiting: (seconds it took or None, last info)."""
    start = time.perf_counter()
    info = None
    while time.perf_counter() - start < timeout:
        with contextlib.suppress(grpc.aio.AioRpcError):
            info = await client.server_info()
            if info.active_sequences == 0 and info.waiting_requests == 0:
                return round(time.perf_counter() - start, 2), info
        await asyncio.sleep(0.1)
    return None, info


def latency_summary(values: list[float], name: str, quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict:
    """{name_p50_ms: ..., name_p90_ms: ..., name_p99_ms: ..., name_max_ms: ...}, rounded; None when empty."""
    out = {f"{name}_p{round(q * 100)}_ms": round(percentile(values, q), 1) if values else None for q in quantiles}
    out[f"{name}_max_ms"] = round(max(values), 1) if values else None
    return out


def status_counts(records: list[TalkRecord]) -> dict[str, int]:
    """Outcomes other than OK, by name (see TalkRecord.outcome)."""
    return dict(sorted(Counter(r.outcome for r in records if not r.ok).items()))


def copy_characters(source: Path, dest: Path) -> list[str]:
    """Copies every character folder of `source` into `dest` (the benches edit and break files)."""
    ids = sorted(p.name for p in source.iterdir() if (p / "character.yaml").is_file())
    if not ids:
        raise FileNotFoundError(f"no characters (*/character.yaml) in {source}")
    for cid in ids:
        shutil.copytree(source / cid, dest / cid)
    return ids


def optional_flags(cfg: Any, defaults: Any) -> list[str]:
    """The `npc bench` flags shared by load and faults, for the values that differ from the defaults."""
    parts = [f"--max-tokens {cfg.max_tokens}"] if cfg.max_tokens else []
    if cfg.deadline != defaults.deadline:
        parts.append(f"--deadline {cfg.deadline:g}")
    if cfg.characters != defaults.characters:
        parts.append(f"--characters {cfg.characters}")
    if cfg.out_dir != defaults.out_dir or cfg.report != defaults.report:
        parts.append(f"--out {cfg.out_dir} --report {cfg.report}")
    return parts
