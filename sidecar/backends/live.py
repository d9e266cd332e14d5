"""The requests in flight on a backend that serves each one with its own asyncio task (a remote
server, TensorRT-LLM): their event queues, the checks and queue rule, cancel and shutdown. One copy,
so that both admit, count, stream (api.RequestStream) and end requests alike, and as the torch
engine does. Torch-free: the remote backend imports it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.config import EngineConfig
from sidecar.engine.admission import check_queue, check_request
from sidecar.engine.api import EngineEvent, RequestStream, SamplingParams, Timings
from sidecar.errors import UserError

Work = Coroutine[Any, Any, None]  # what serves one request, as its task


@dataclass
class Live:
    """One request in flight: what its stream reads (events, or an exception to raise) and the task serving it."""

    request_id: str
    scoring: bool  # a choices request: admission.check_queue neither counts nor refuses it
    timings: Timings
    queue: asyncio.Queue[EngineEvent | Exception] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    on_end: list[Callable[[], None]] = field(default_factory=list)  # run when the task is done (e.g. unpin)
    ended: bool = False

    def emit(self, event: EngineEvent) -> None:
        """Queues an event; nothing after the "finished" or "error" one."""
        if not self.ended:
            self.ended = event.kind in ("finished", "error")
            self.queue.put_nowait(event)

    def fail(self, exc: Exception) -> None:
        """Ends the stream by raising `exc` in it: a refusal after submit() (QueueFull, BackendUnavailable)."""
        if not self.ended:
            self.ended = True
            self.queue.put_nowait(exc)


class LiveRequests:
    """A backend's requests in flight, by id. Such a backend queues by itself, so the replies beyond
    max_batch count as waiting: what the torch engine's counts mean, and what max_waiting bounds."""

    def __init__(self, config: EngineConfig, id_prefix: str):
        self.config = config
        self.stopping = False
        self._live: dict[str, Live] = {}
        self._replies = 0  # requests in _live that generate (not scoring): kept, so queue_full() is O(1)
        self._ids = (f"{id_prefix}-{n}" for n in itertools.count())

    def waiting_replies(self) -> int:
        return max(0, self._replies - self.config.max_batch)

    def queue_full(self) -> bool:
        """Whether a reply submitted now would be refused for a full queue (the servicer's early check)."""
        return self.waiting_replies() >= self.config.max_waiting

    def submit(self, prompt_ids: Sequence[int], choices: Sequence[Sequence[int]] | None, sampling: SamplingParams,
               request_id: str | None, timings: Timings | None, max_len: int, vocab_size: int,
               generate: Callable[[Live, list[int], int], Work],
               score: Callable[[Live, list[int], list[list[int]]], Work], constrained: bool = False) -> RequestStream:
        """A backend's submit(): the checks every backend makes (engine/admission.py), then the task:
        `generate(live, prompt, max_tokens)` with max_tokens clamped to the room left in max_len, or
        `score(live, prompt, candidates)` for a choices request."""
        if sampling.grammar is not None and not constrained:
            raise UserError("this backend does not constrain decoding to a grammar (the torch backend does)")
        if sampling.contrast is not None:
            raise UserError("this backend does not decode against a second prompt (contrast; the torch backend does)")
        room = check_request(prompt_ids, choices, max_len, vocab_size)
        prompt = list(prompt_ids)
        if choices is not None:
            candidates = [list(c) for c in choices]
            return self._start(request_id, timings, scoring=True, work=lambda live: score(live, prompt, candidates))
        max_tokens = min(sampling.max_tokens, room)
        return self._start(request_id, timings, scoring=False, work=lambda live: generate(live, prompt, max_tokens))

    def _start(self, request_id: str | None, timings: Timings | None, scoring: bool,
               work: Callable[[Live], Work]) -> RequestStream:
        """Admits a request (raises QueueFull) and runs `work(live)` as its task on the running loop.
        A task done for any reason, even cancelled before it ran, ends the stream (finish_reason "cancelled"
        unless the work finished it)."""
        check_queue(self.waiting_replies(), self.config.max_waiting, scoring, self.stopping)
        live = Live(request_id or next(self._ids), scoring, timings or Timings())
        self._live[live.request_id] = live
        self._replies += 0 if scoring else 1
        live.task = asyncio.get_running_loop().create_task(work(live))
        live.task.add_done_callback(lambda _: self._ended(live))
        return RequestStream(live.request_id, live.queue, self.cancel)

    def cancel(self, request_id: str) -> bool:
        """Cancels a request's task: False when there is none or it has already ended."""
        live = self._live.get(request_id)
        if live is None or live.task is None or live.task.done():
            return False
        live.task.cancel()
        return True

    def counts(self) -> dict[str, int]:
        """stats()' request counts: replies generating (up to max_batch) and waiting beyond it."""
        return {"active_sequences": min(self._replies, self.config.max_batch),
                "waiting_requests": self.waiting_replies()}

    async def shutdown(self, cancel_running: bool, timeout: float = 5) -> None:
        """Refuses new requests, cancels those in flight (or lets them run) and waits up to `timeout` seconds,
        so that each stream gets its last event before the backend's client or executor closes."""
        self.stopping = True
        tasks = [live.task for live in self._live.values() if live.task is not None]
        if cancel_running:
            for task in tasks:
                task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def _ended(self, live: Live) -> None:
        """The task is done: forget the request; its stream still gets an end if the work gave none."""
        if self._live.get(live.request_id) is live:
            del self._live[live.request_id]
        self._replies -= 0 if live.scoring else 1
        for hook in live.on_end:
            hook()
        live.emit(EngineEvent("finished", live.request_id, finish_reason="cancelled", **live.timings.ms()))
