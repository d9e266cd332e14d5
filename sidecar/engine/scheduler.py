"""Continuous batching: who waits, who prefills, who decodes. Decides only: the engine runs the plan
and tells the clients (llm_engine.py); K/V rows belong to kv_cache.KvRows.

Every step decodes every running sequence (so no NPC falls more than one step behind) and feeds
at most one chunk of one new prompt through the model, so a long persona never freezes the
others. A new sequence prefills in the staging row and joins the running rows when done. A contrasted
reply (SamplingParams.contrast) is admitted with its shadow, which prefills first in the shadow's staging
row; both join the running rows together when the reply's prompt is in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sidecar.config import EngineConfig
from sidecar.engine.adapters import AdapterCache
from sidecar.engine.admission import check_queue
from sidecar.engine.kv_cache import KvRows
from sidecar.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class StepPlan:
    decode: list[Sequence]  # running sequences, in KV-row order (row i = decode[i])
    prefill: Sequence | None  # the sequence whose prompt chunk runs this step
    prefill_range: tuple[int, int] = (0, 0)  # prompt positions [lo, hi) of that chunk
    admitted: Sequence | None = None  # got its place this step (it is `prefill`)
    cancelled: list[Sequence] = field(default_factory=list)  # removed this step

    @property
    def completes_prefill(self) -> bool:
        return self.prefill is not None and self.prefill_range[1] == len(self.prefill.prompt)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KvRows, adapters: AdapterCache):
        self.config, self.kv, self.adapters = config, kv, adapters
        self.waiting: deque[Sequence] = deque()
        # Replies (not scoring requests) in `waiting`: what max_waiting bounds. A plain int, so that
        # AsyncEngine reads it from the event loop's thread without iterating a deque this thread changes.
        self.waiting_replies = 0
        self.prefilling: Sequence | None = None
        self._staged: Sequence | None = None  # a contrasted reply staged after its shadow: announced next step

    @property
    def running(self) -> list[Sequence]:
        return self.kv.running

    def add(self, seq: Sequence) -> None:
        """Queues a sequence; raises QueueFull (admission.check_queue). Scoring a finished reply (its
        emotion) completes a conversation already served: it goes first. A player's reply goes before the
        background ones (scene lines): a player waits for at most the line being prefilled, not for every
        scene's next line."""
        check_queue(self.waiting_replies, self.config.max_waiting, scoring=seq.scoring)
        if seq.scoring:
            self.waiting.appendleft(seq)
            return
        first_background = next((i for i, s in enumerate(self.waiting) if s.background), None)
        if seq.background or first_background is None:
            self.waiting.append(seq)
        else:
            self.waiting.insert(first_background, seq)
        self.waiting_replies += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def schedule(self) -> StepPlan:
        cancelled = self._drop_cancelled()
        admitted = self._admit() if self.prefilling is None else self._take_staged()
        seq = self.prefilling
        if seq is None:
            return StepPlan(list(self.running), None, cancelled=cancelled)
        remaining = len(seq.prompt) - seq.num_computed
        # Alone, a prompt goes through in one piece; with others decoding it is chunked.
        chunk = min(self.config.prefill_chunk if self.running else remaining, remaining)
        return StepPlan(list(self.running), seq, (seq.num_computed, seq.num_computed + chunk), admitted, cancelled)

    def _admit(self) -> Sequence | None:
        """Starts prefilling the first waiting sequence whose adapter has a slot (others keep their
        place). A full batch admits only scoring requests: they never join the running rows."""
        short_of_rows = False
        for seq in list(self.waiting):
            if not seq.scoring and (short_of_rows or self.kv.free_rows < (2 if seq.shadow else 1)):
                short_of_rows = True  # replies keep their order: none takes the row a contrasted one waits for
                continue
            if seq.adapter is not None:
                acquired = self.adapters.acquire(seq.adapter)
                if acquired is None:
                    continue  # every slot is pinned by a running sequence; retry next step
                seq.slot, seq.adapter_key = acquired[0], f"{seq.adapter.name}:{acquired[1]}"
            self._unqueue(seq)
            if seq.shadow is None:
                self._stage(seq)
                self.prefilling = seq
                return seq
            # The shadow's prompt goes through first; the reply is staged after it, so that it finds the prefix
            # they share (persona, history) in the prefix cache and prefills only its facts and the line.
            seq.status = Status.PREFILLING
            seq.shadow.slot, seq.shadow.adapter_key = seq.slot, seq.adapter_key  # the reply's pin serves both
            self._stage(seq.shadow)
            self.prefilling = seq.shadow
            return None
        return None

    def _take_staged(self) -> Sequence | None:
        staged, self._staged = self._staged, None
        return staged if staged is not None and staged.status == Status.PREFILLING else None

    def _stage(self, seq: Sequence) -> None:
        seq.status = Status.PREFILLING
        seq.cached_tokens = self.kv.stage(seq)
        seq.num_computed = seq.cached_tokens

    def prefill_done(self, seq: Sequence) -> None:
        """A whole prompt is in its staging row. A shadow's: its reply's prompt goes next. A reply's: it
        joins the running rows (with its shadow)."""
        if seq.shadow_of is not None:
            self.kv.keep_prefix(seq)
            self._stage(seq.shadow_of)
            self.prefilling = self._staged = seq.shadow_of
            return
        for done in (seq.shadow, seq) if seq.shadow is not None else (seq,):
            self.kv.promote(done)
            done.status = Status.RUNNING
        self.prefilling = None

    def finish(self, seq: Sequence) -> None:
        """Removes a reply (with its shadow) wherever it is and frees its rows and its adapter pin."""
        shadow = seq.shadow
        if seq.status == Status.RUNNING:
            self.kv.release(seq)
        elif self.prefilling is not None and self.prefilling in (seq, shadow):
            self.prefilling = None
        elif seq.status == Status.WAITING:
            self._unqueue(seq)
        if shadow is not None:
            if shadow.status == Status.RUNNING:
                self.kv.release(shadow)
            shadow.status, shadow.first_logits = Status.FINISHED, None
        if seq.adapter is not None and seq.status in (Status.PREFILLING, Status.RUNNING):
            self.adapters.release(seq.adapter)
        seq.status = Status.FINISHED

    def active(self) -> list[Sequence]:
        """The replies (and scoring requests) of the current batch: running and prefilling; shadows are
        their replies' business."""
        prefilling = self.prefilling.shadow_of or self.prefilling if self.prefilling else None
        return [*(s for s in self.running if s.shadow_of is None), *([prefilling] if prefilling else [])]

    def rows_in_use(self) -> int:
        """Rows the batch holds: the running ones, and those the prefilling reply (and its shadow) will take."""
        reply = self.prefilling.shadow_of or self.prefilling if self.prefilling else None
        return len(self.running) + (0 if reply is None else 1 + (reply.shadow is not None))

    def _unqueue(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        if not seq.scoring:
            self.waiting_replies -= 1

    def _drop_cancelled(self) -> list[Sequence]:
        cancelled = [s for s in (*self.waiting, *self.active()) if s.cancelled]
        for seq in cancelled:
            self.finish(seq)
        return cancelled
