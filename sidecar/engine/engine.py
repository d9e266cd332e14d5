"""AsyncEngine: the torch engine behind the `Engine` protocol (engine/api.py) that asyncio code uses.

The model runs on one background thread (torch releases the GIL inside kernels), so the event
loop that serves gRPC never blocks on a forward pass. Events cross back with
`loop.call_soon_threadsafe`.

Give the engine a loader, not a loaded model, where speed matters: all torch work should happen
on the one engine thread. Once another thread (typically main, loading the model) has run
OpenMP-parallel torch ops, forward passes on a second thread ran 1.6x slower on this 2-core
machine (15.5 vs 25 ms per batch-8 decode step; docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import structlog

from sidecar.config import EngineConfig
from sidecar.engine.admission import check_queue
from sidecar.engine.api import (
    AdapterRef,
    Engine,
    EngineEvent,
    EngineStats,
    ModelInfo,
    RequestStream,
    SamplingParams,
    Timings,
)
from sidecar.engine.base_model import BaseModel
from sidecar.engine.llm_engine import LLMEngine
from sidecar.engine.sequence import Sequence as Seq

log = structlog.get_logger(__name__)


class AsyncEngine(Engine):
    def __init__(self, base: BaseModel | Callable[[], BaseModel], config: EngineConfig | None = None):
        """`base` is a loaded model or a function that loads one (then it runs on the engine thread)."""
        self.config = config or EngineConfig()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[Seq] = []
        self._live: dict[str, Seq] = {}
        # Events of the step in progress, delivered when it ends (engine thread only).
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, EngineEvent]] = []
        self._stopping = False
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(base,), name="npc-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def _run(self, base: BaseModel | Callable[[], BaseModel]) -> None:
        try:
            self.base = base if isinstance(base, BaseModel) else base()
            self.core = LLMEngine(self.base, self.config, progress=sys.stderr.isatty())
            model = self.base.model
            self.name = f"torch-{model.device}"
            self.constrained_decoding = True
            self.contrast_decoding = self.config.max_batch >= 2  # a reply and its shadow row (LLMEngine.make_sequence)
            self.config = replace(self.config, max_seq_len=self.core.kv.cache.max_len)  # what a KV row holds
            self.model = ModelInfo(self.base.path, model.weights, str(model.device), self.base.tokenizer,
                                   model.config)
        except BaseException as e:  # handed to the constructor's caller
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop()

    def load_adapter(self, name: str, path: Path, version: str, scale: float = 1.0) -> AdapterRef:
        return self.core.load_adapter(name, path, version, scale)

    def submit(self, prompt_ids: Sequence[int], adapter: AdapterRef | None, sampling: SamplingParams, *,
               request_id: str | None = None, choices: Sequence[Sequence[int]] | None = None,
               timings: Timings | None = None, background: bool = False) -> RequestStream:
        """Queues a request (`background`: see Engine.submit). Raises QueueFull when max_waiting replies are
        queued (admission.check_queue), UserError for bad input.

        With `choices` the request scores those continuations instead of generating (LLMEngine.make_sequence).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent | Exception] = asyncio.Queue()

        def emit(event: EngineEvent) -> None:  # on the engine thread, during a step
            if event.kind in ("finished", "error"):
                with self._lock:
                    self._live.pop(event.request_id, None)
            self._outbox.append((loop, queue, event))

        seq = self.core.make_sequence(prompt_ids, adapter, sampling, emit, request_id, choices, timings, background)
        with self._lock:
            check_queue(self._waiting_replies(), self.config.max_waiting, scoring=seq.scoring,
                        stopping=self._stopping)
            self._inbox.append(seq)
            self._live[seq.request_id] = seq
            self._wake.notify()
        return RequestStream(seq.request_id, queue, self.cancel)

    def cancel(self, request_id: str) -> bool:
        """Cancels a request; its stream ends with finish_reason "cancelled" within one step."""
        with self._lock:
            seq = self._live.get(request_id)
            if seq is None:
                return False
            seq.cancelled = True
            self._wake.notify()
        return True

    def queue_full(self) -> bool:
        """Whether a reply submitted now would be refused for a full queue: the servicer's cheap early
        check (no stats dict), before it builds a prompt. submit() decides."""
        with self._lock:
            return self._waiting_replies() >= self.config.max_waiting

    def _waiting_replies(self) -> int:
        """Replies queued here or in the scheduler (held lock: the loop moves them across under it)."""
        return sum(1 for seq in self._inbox if not seq.scoring) + self.core.scheduler.waiting_replies

    def stats(self) -> EngineStats:
        """The engine thread's last snapshot (never its live structures, which that thread is changing),
        with the replies waiting now: what max_waiting bounds."""
        with self._lock:
            waiting = self._waiting_replies()
        return replace(self.core.stats(), waiting_requests=waiting)

    def missing_adapters(self, names: Sequence[str]) -> list[str]:
        return []  # adapters come with each request

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._inbox and not self.core.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
                # Under the lock: a sequence is always in the inbox or the scheduler when submit() counts.
                for seq in self._inbox:
                    self.core.add(seq)  # never QueueFull: submit() checked the same count
                self._inbox.clear()
            try:
                self.core.step()
            except Exception as e:  # a bug must not silence every NPC: end this batch, keep serving
                ended = self.core.fail_active(f"internal error in the engine ({type(e).__name__}: {e})")
                log.exception("engine step failed; the replies in it ended with an error", ended=ended)
            self._deliver()
            if self.core.scheduler.waiting and not self.core.scheduler.active():
                # Nothing ran, so nothing freed a slot or a row either: do not spin.
                with self._lock:
                    self._wake.wait(timeout=0.005)

    def _deliver(self) -> None:
        """Hands the step's events to their event loops, after the step (and its stats snapshot) is done:
        whoever reads a reply's end then sees stats that include it."""
        events, self._outbox = self._outbox, []
        for loop, queue, event in events:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:
                pass  # that event loop is gone (shutdown): nobody is listening any more

    async def shutdown(self, cancel_running: bool = True) -> None:
        """Stops the step thread; with cancel_running, live requests end as cancelled first."""
        if cancel_running:
            with self._lock:
                for seq in self._live.values():
                    seq.cancelled = True
                self._wake.notify()
            for _ in range(200):
                if not self._live:
                    break
                await asyncio.sleep(0.01)
        with self._lock:
            self._stopping = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join, 5)
        if not self._thread.is_alive():
            self.core.grammars.close()
