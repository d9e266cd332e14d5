"""What every backend offers the layers above it: the `Engine` protocol and the values that cross it.

The in-process torch engine (engine/engine.py), a remote OpenAI-compatible server
(backends/remote.py) and TensorRT-LLM (backends/tensorrt_llm.py) each declare `Engine`; the
dialogue and server layers see nothing else of them. This module imports no torch, so a process
that serves through a remote backend never loads it.

A request: `submit(prompt ids, adapter, sampling)` returns a `RequestStream` of `EngineEvent`s:
"started", then "delta"s (text, never half a UTF-8 character), then exactly one "finished" (or
"error"). With `choices`, nothing is generated: each candidate continuation is scored and the
"finished" event carries the log-probabilities (reason "choice").
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sidecar.config import EngineConfig
from sidecar.errors import AdapterError, UserError

if TYPE_CHECKING:
    from sidecar.engine.tokenizer import Tokenizer
    from sidecar.model.config import LlamaConfig
    from sidecar.model.lora import LoraAdapter

__all__ = ["AdapterError", "AdapterRef", "BackendUnavailable", "Contrast", "Engine", "EngineEvent", "EngineStats",
           "GrammarError", "ModelInfo", "QueueFull", "RequestStream", "SamplingParams", "Timings"]


class QueueFull(Exception):
    """No room for another reply to wait, or the engine is stopping: the caller answers RESOURCE_EXHAUSTED."""


class GrammarError(UserError):
    """A SamplingParams.grammar the backend cannot compile; the message starts with `grammar:`."""


class BackendUnavailable(Exception):
    """The model server behind the sidecar cannot be reached or failed to answer (gRPC UNAVAILABLE)."""


@dataclass(frozen=True)
class Contrast:
    """Context-aware decoding (Shi et al. 2023): every token is chosen from
    (1 + weight) x log p(token | prompt) - weight x log p(token | prompt_without), among the tokens at
    least PLAUSIBLE x as likely as the best under the prompt. What the prompt holds beyond
    `prompt_without` (a turn's facts) then counts for more than the adapter's habits. The torch engine
    decodes `prompt_without` in a second K/V row beside the reply, under the same adapter."""

    prompt_without: tuple[int, ...]
    weight: float

    PLAUSIBLE = 0.1  # Li et al. 2023's cut: a token the prompt itself finds unlikely is never promoted

    def __post_init__(self) -> None:
        if not self.prompt_without:
            raise UserError("contrast: prompt_without is empty")
        if not math.isfinite(self.weight) or not 0 < self.weight <= 4:
            raise UserError(f"contrast: weight must be in (0, 4], got {self.weight}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = all tokens
    # Tokens less likely than min_p x the likeliest are never drawn (0 = off): keeps a sampled reply
    # on the word the model is sure of (a price, a name) while leaving variety where it is unsure.
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the reply
    stop: tuple[str, ...] = ()  # the reply ends before the first occurrence of any of these
    seed: int | None = None  # same seed, same request, run alone -> same reply
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    # Constrained decoding: the reply must match this Lark grammar (llguidance's dialect, `%json{...}`
    # embeds a JSON schema); engines whose `constrained_decoding` is False refuse it.
    grammar: str | None = None
    # Added to the logits of these token ids at every step, before the grammar and sampling (OpenAI's
    # logit_bias): the dialogue raises the tokens only a turn's facts bring (dialogue/prompt.fact_tokens).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Decode against a second prompt (Contrast); engines that cannot take it refuse it at submit.
    contrast: Contrast | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.min_p) or not 0 <= self.min_p <= 1:
            raise UserError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")
        if any(token < 0 or not math.isfinite(bias) for token, bias in self.logit_bias):
            raise UserError("logit_bias: token ids must be >= 0 and biases finite numbers")
        if self.grammar is not None and self.ignore_eos:
            raise UserError("a grammar decides where the reply ends: it cannot be combined with ignore_eos")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class AdapterRef:
    """A validated adapter, as `Engine.load_adapter` returns it: the only way requests name one.

    `loaded` holds the weights read and checked against the base model when the ref was made, so
    a file overwritten (or half-copied) afterwards can never change what this version says.
    """

    name: str
    path: Path
    version: str
    scale: float  # multiplies the adapter's deltas (a character's lora_scale)
    loaded: LoraAdapter = field(compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str, float]:
        """Identity of the weights: the same key always means the same deltas."""
        return (self.name, self.version, self.scale)

    @property
    def label(self) -> str:
        return adapter_label(self.key)


def adapter_label(key: tuple[str, str, float]) -> str:
    """How logs and ServerInfo name an adapter version: name@version, with xSCALE when scaled."""
    name, version, scale = key
    return f"{name}@{version}" + ("" if scale == 1.0 else f"x{scale}")


@dataclass(frozen=True)
class ModelInfo:
    """The base model a backend serves, as the layers above need it."""

    path: Path
    weights: str  # the format in memory ("int4", "bf16", ...); "" where a remote holds it
    device: str
    tokenizer: Tokenizer  # prompts are built and budgeted with it on every backend
    shape: LlamaConfig  # what adapters are validated against


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for ServerInfo; taken by the backend, never computed from live structures by the reader."""

    active_sequences: int = 0
    waiting_requests: int = 0  # replies waiting for a place in the batch: what max_waiting bounds
    resident_adapters: tuple[str, ...] = ()
    prefix_cache_bytes: int = 0
    prefix_cache_capacity_bytes: int = 0
    prefix_hits: int = 0
    prefix_lookups: int = 0
    steps: int = 0
    batch_rows_in_use: int = 0  # active_sequences plus their shadows (a contrasted reply takes two rows)
    kv_cache_bytes: int = 0  # K/V allocated for the batch's rows


class Timings:
    """When a request arrived, got a place in the batch, and streamed its first text; the one place
    where those durations are computed. The caller may create it when the request reached the
    process (a Talk's arrival) and hand it to submit(); the backend marks the rest."""

    def __init__(self, arrival: float | None = None):
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.started = 0.0
        self.first_text = 0.0

    def mark_started(self) -> None:
        self.started = self.started or time.perf_counter()

    def mark_first_text(self) -> None:
        self.first_text = self.first_text or time.perf_counter()

    def ms(self, now: float | None = None) -> dict[str, float]:
        """queue_ms (until a place in the batch), first_token_ms (until the first text; 0 without
        text) and total_ms (until now), all from the arrival."""
        now = time.perf_counter() if now is None else now
        since = lambda t: (t - self.arrival) * 1000  # noqa: E731
        return {"queue_ms": since(self.started or now), "first_token_ms": since(self.first_text) if self.first_text
                else 0.0, "total_ms": since(now)}


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
    choice_logprobs: tuple[float, ...] = ()  # ...every candidate's log-probability (the sum of the next field's)
    choice_token_logprobs: tuple[tuple[float, ...], ...] = ()  # ...and each of its tokens' own, one log-softmax each


class RequestStream:
    """Async iterator over one request's events, on every backend; ends after its "finished" or "error"
    event, or raises an exception queued in their place (a remote's refusal that came after submit():
    QueueFull, BackendUnavailable). Closing it early (break, or the consumer being cancelled) cancels
    the request."""

    def __init__(self, request_id: str, queue: asyncio.Queue[EngineEvent | Exception],
                 cancel: Callable[[str], object]):
        self.request_id, self._queue, self._cancel = request_id, queue, cancel
        self._done = False

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[EngineEvent]:
        try:
            while not self._done:
                item = await self._queue.get()
                if isinstance(item, Exception):
                    self._done = True
                    raise item
                self._done = item.kind in ("finished", "error")
                yield item
        finally:
            if not self._done:
                self.cancel()

    def cancel(self) -> None:
        self._cancel(self.request_id)


class Engine(Protocol):
    """What runs the model, as the dialogue and server layers use it. Every backend declares it."""

    name: str  # what ServerInfo.backend says: "torch-cpu", "torch-cuda", "remote", "tensorrt-llm"
    constrained_decoding: bool  # whether SamplingParams.grammar is honoured (else submit refuses it)
    contrast_decoding: bool  # whether SamplingParams.contrast is honoured (else submit refuses it)
    config: EngineConfig  # limits; max_seq_len is what a prompt + reply may take on this backend
    model: ModelInfo

    def load_adapter(self, name: str, path: Path, version: str, scale: float = 1.0) -> AdapterRef:
        """Reads and validates a PEFT folder against the base model (blocking: call it off the event
        loop); raises AdapterError naming the problem."""
        ...

    def submit(self, prompt_ids: Sequence[int], adapter: AdapterRef | None, sampling: SamplingParams, *,
               request_id: str | None = None, choices: Sequence[Sequence[int]] | None = None,
               timings: Timings | None = None, background: bool = False) -> RequestStream:
        """Queues a request (from the event loop's thread). Raises QueueFull when max_waiting replies
        wait, UserError for bad input (engine/admission.py: alike on every backend).
        `background`: a reply no player is waiting for (a scene's line); it waits behind every other reply
        for a place in the batch (where the backend schedules; a remote has no such field)."""
        ...

    def cancel(self, request_id: str) -> bool:
        """Ends a request early: its stream finishes with reason "cancelled"."""
        ...

    def queue_full(self) -> bool:
        """Whether a reply submitted now would be refused: a cheap early check; submit() decides."""
        ...

    def stats(self) -> EngineStats: ...

    def missing_adapters(self, names: Sequence[str]) -> list[str]:
        """Of these adapter names, those the backend cannot serve by name (a remote that does not list
        them); empty where adapters travel with the request."""
        ...

    async def shutdown(self, cancel_running: bool = True) -> None:
        """Refuses new requests; with cancel_running, live ones end as cancelled first."""
        ...
