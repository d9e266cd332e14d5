"""Per-request state inside the torch engine."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar.engine.api import AdapterRef, EngineEvent, SamplingParams
from sidecar.engine.output import RequestOutput
from sidecar.engine.sampler import Sampler


class Status(enum.Enum):
    WAITING = "waiting"  # queued for a place in the batch (or a free adapter slot)
    PREFILLING = "prefilling"  # prompt going through the model in chunks
    RUNNING = "running"  # decoding one token per step
    FINISHED = "finished"


@dataclass(eq=False)  # compared by identity: the scheduler finds a sequence in its lists
class Sequence:
    request_id: str
    prompt: list[int]
    adapter: AdapterRef | None
    params: SamplingParams
    emit: Callable[[EngineEvent], None]
    out: RequestOutput  # the request's events (tokens -> text, stops, timings)
    choices: tuple[tuple[int, ...], ...] | None = None  # score these continuations instead of generating
    status: Status = Status.WAITING
    slot: int = -1  # adapter slot; -1 = base model
    adapter_key: str = "base"  # identity of the weights used, for the prefix cache
    num_computed: int = 0  # tokens whose K/V are in the cache
    cached_tokens: int = 0  # ...of which came from the prefix cache
    cancelled: bool = False
    matcher: Any = None  # llguidance.LLMatcher of a constrained reply (engine/grammar.py); None = free
    background: bool = False  # nobody waits on it (a scene's line): queued behind the other replies
    # Context-aware decoding (SamplingParams.contrast): the reply's `shadow` decodes the prompt without
    # the facts in a K/V row of its own, under the same adapter; it shares the reply's `out`, so it is
    # fed the tokens the reply takes, and it never samples or emits. On a shadow, `shadow_of` is the reply.
    shadow: Sequence | None = None
    shadow_of: Sequence | None = None
    first_logits: Any = None  # (a shadow's) logits after its prompt, held until the reply's prompt is in
    sampler: Sampler = field(init=False)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params)

    @property
    def scoring(self) -> bool:
        return self.choices is not None

    @property
    def output(self) -> list[int]:
        return self.out.output

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    def history(self) -> list[int]:
        return self.prompt + self.output

    def send(self, events: list[EngineEvent]) -> None:
        for event in events:
            self.emit(event)
