"""Continuous batching: who waits, who prefills, who decodes, and where each one's K/V lives.

Every step decodes every running sequence (so no NPC falls more than one step behind) and feeds
at most one chunk of one new prompt through the model, so a long persona never freezes the
others. A new sequence prefills in the staging row and joins the running rows when done.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from sidecar.config import EngineConfig
from sidecar.engine.adapters import AdapterCache
from sidecar.engine.admission import QueueFull, check_queue
from sidecar.engine.kv_cache import PrefixCache
from sidecar.engine.sequence import EngineEvent, Sequence, Status
from sidecar.model.llama import KVCache
from sidecar.model.lora import AdapterError

__all__ = ["QueueFull", "Scheduler", "StepPlan"]  # QueueFull: engine/admission.py, named here too


@dataclass(frozen=True)
class StepPlan:
    decode: list[Sequence]  # running sequences, in KV-row order (row i = decode[i])
    prefill: Sequence | None  # the sequence whose prompt chunk runs this step
    prefill_range: tuple[int, int] = (0, 0)  # prompt positions [lo, hi) of that chunk


class Scheduler:
    def __init__(self, config: EngineConfig, cache: KVCache, prefix: PrefixCache, adapters: AdapterCache | None):
        self.config, self.cache, self.prefix, self.adapters = config, cache, prefix, adapters
        self.waiting: deque[Sequence] = deque()
        # Replies (not scoring requests) in `waiting`: what max_waiting bounds. A plain int, so that
        # AsyncEngine reads it from the event loop's thread without iterating a deque this thread changes.
        self.waiting_replies = 0
        self.running: list[Sequence] = []
        self.prefilling: Sequence | None = None
        self.staging_row = config.max_batch

    def add(self, seq: Sequence) -> None:
        """Queues a sequence; raises QueueFull (admission.check_queue). Scoring a finished reply (its
        emotion) completes a conversation already served: it goes first."""
        check_queue(self.waiting_replies, self.config.max_waiting, scoring=seq.choices is not None)
        if seq.choices is not None:
            self.waiting.appendleft(seq)
            return
        self.waiting.append(seq)
        self.waiting_replies += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def schedule(self) -> StepPlan:
        self._drop_cancelled()
        if self.prefilling is None:
            self._admit(batch_full=len(self.running) >= self.config.max_batch)
        plan = StepPlan(list(self.running), None)
        seq = self.prefilling
        if seq is not None:
            remaining = len(seq.prompt) - seq.num_computed
            # Alone, a prompt goes through in one piece; with others decoding it is chunked.
            chunk = self.config.prefill_chunk if self.running else remaining
            plan = StepPlan(plan.decode, seq, (seq.num_computed, seq.num_computed + min(chunk, remaining)))
        return plan

    def _admit(self, batch_full: bool) -> None:
        """Starts prefilling the first waiting sequence whose adapter is ready (others keep their place).
        A full batch admits only choice requests: they never join the running rows."""
        for seq in list(self.waiting):
            if batch_full and seq.choices is None:
                continue
            if seq.adapter is not None and self.adapters is not None:
                try:
                    acquired = self.adapters.acquire(seq.adapter)
                except AdapterError as e:
                    self.adapters.forget_failed(seq.adapter)
                    self._unqueue(seq)
                    self._fail(seq, str(e))
                    continue
                if acquired is None:
                    continue  # loading in the background, or every slot pinned
                seq.slot, seq.adapter_key = acquired[0], f"{seq.adapter.name}:{acquired[1]}"
            self._unqueue(seq)
            seq.status = Status.PREFILLING
            seq.started = time.perf_counter()
            seq.cached_tokens = self.prefix.lookup(seq.adapter_key, seq.prompt, self.cache, self.staging_row)
            seq.num_computed = seq.cached_tokens
            self.prefilling = seq
            seq.emit(EngineEvent("started", seq.request_id, prompt_tokens=len(seq.prompt),
                                 cached_tokens=seq.cached_tokens, queue_ms=(seq.started - seq.submitted) * 1000))
            return

    def prefill_done(self, seq: Sequence) -> None:
        """The whole prompt is in the staging row: save its prefix, move it to the running rows."""
        self.prefix.insert(seq.adapter_key, seq.prompt, self.cache, self.staging_row)
        row = len(self.running)
        self.cache.copy_row(self.staging_row, row, seq.num_computed)
        self.running.append(seq)
        self.prefilling = None
        seq.status = Status.RUNNING

    def finish(self, seq: Sequence) -> None:
        """Removes a sequence wherever it is, frees its row (compacting the running rows) and its pin."""
        if seq in self.running:
            i, last = self.running.index(seq), len(self.running) - 1
            if i != last:
                moved = self.running[last]
                self.cache.copy_row(last, i, moved.num_computed)
                self.running[i] = moved
            self.running.pop()
        elif seq is self.prefilling:
            self.prefilling = None
        elif seq in self.waiting:
            self._unqueue(seq)
        if seq.adapter is not None and self.adapters is not None and seq.status != Status.WAITING:
            self.adapters.release(seq.adapter)
        seq.status = Status.FINISHED

    def _unqueue(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        if seq.choices is None:
            self.waiting_replies -= 1

    def _drop_cancelled(self) -> None:
        for seq in [s for s in (*self.waiting, *self.running, self.prefilling) if s is not None and s.cancelled]:
            self.finish(seq)
            seq.emit(EngineEvent("finished", seq.request_id, text=seq.text, token_ids=tuple(seq.output),
                                 finish_reason="cancelled", prompt_tokens=len(seq.prompt),
                                 cached_tokens=seq.cached_tokens, completion_tokens=len(seq.output),
                                 **seq.timing_fields()))

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.status = Status.FINISHED
        seq.emit(EngineEvent("error", seq.request_id, finish_reason="error", error=message,
                             prompt_tokens=len(seq.prompt), **seq.timing_fields()))
