"""Per-request state inside the engine, and the events a request's stream yields."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.engine.sampler import Sampler, SamplingParams, StopStringFilter
from sidecar.engine.tokenizer import Detokenizer
from sidecar.model.lora import LoraAdapter


@dataclass(frozen=True)
class AdapterRef:
    """Which adapter a request uses: the engine loads `path` once per (name, version).

    `loaded`, when given, is the adapter already read and validated (the server keeps each
    character's last good adapter in memory), so the engine never re-reads files that may have
    changed since that version was checked.
    """

    name: str
    path: Path
    version: str = "1"
    scale: float = 1.0  # multiplies the adapter's deltas (a character's lora_scale)
    loaded: LoraAdapter | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str, float]:
        return (self.name, self.version, self.scale)


class Status(enum.Enum):
    WAITING = "waiting"  # queued; its adapter may still be loading
    PREFILLING = "prefilling"  # prompt going through the model in chunks
    RUNNING = "running"  # decoding one token per step
    FINISHED = "finished"


@dataclass(frozen=True)
class EngineEvent:
    """What a request's stream yields, in order: started, delta*, then finished (or error)."""

    kind: str  # "started" | "delta" | "finished" | "error"
    request_id: str
    text: str = ""  # delta: new text; finished: the whole reply
    token_ids: tuple[int, ...] = ()  # delta: the ids behind the text; finished: all reply ids
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | "choice"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int = 0
    queue_ms: float = 0.0
    first_token_ms: float = 0.0
    total_ms: float = 0.0
    error: str | None = None
    internal: bool = False  # error: the engine failed (a bug), not the request's input
    choice: int | None = None  # a choice request: the index of the most likely candidate
    choice_logprobs: tuple[float, ...] = ()  # ...and every candidate's log-probability


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    adapter: AdapterRef | None
    params: SamplingParams
    emit: Callable[[EngineEvent], None]
    detokenizer: Detokenizer
    max_tokens: int  # params.max_tokens, clamped to the room left in the KV row
    choices: tuple[tuple[int, ...], ...] | None = None  # score these continuations instead of generating
    status: Status = Status.WAITING
    slot: int = -1  # adapter slot; -1 = base model
    adapter_key: str = "base"  # identity of the weights used, for the prefix cache
    num_computed: int = 0  # tokens whose K/V are in the cache
    cached_tokens: int = 0
    output: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)  # sampled, text not streamed yet
    text: str = ""  # the reply as streamed so far
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    first_token: float = 0.0

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)
        self.stops = StopStringFilter(self.params.stop)

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    def history(self) -> list[int]:
        return self.prompt + self.output

    def timing_fields(self) -> dict[str, float]:
        now = time.perf_counter()
        return {
            "queue_ms": ((self.started or now) - self.submitted) * 1000,
            "first_token_ms": ((self.first_token or now) - self.submitted) * 1000,
            "total_ms": (now - self.submitted) * 1000,
        }
