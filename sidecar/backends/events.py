"""Generated token ids -> engine events, for the backends that generate elsewhere (TensorRT-LLM, a
remote server): the started / delta / finished stream the torch engine emits, cut and spelled by
our own detokenizer and stop-string filter, so a reply reads the same on every backend."""

from __future__ import annotations

import time
from collections.abc import Sequence

from sidecar.engine.sampler import SamplingParams, StopStringFilter
from sidecar.engine.sequence import EngineEvent
from sidecar.engine.tokenizer import Detokenizer


def engine_reason(reported: str | None) -> str:
    """Our finish reason for the one a backend reports: "stop" and "length" as they are; anything
    else (TensorRT-LLM's "timeout", a server's "abort") ended the reply early, which is "cancelled"."""
    return reported if reported in ("stop", "length") else "cancelled"


class TokenEvents:
    """One reply's generated token ids -> our engine events, as the torch engine emits them.

    Backends report tokens in one of two ways: `tokens()` takes the ids generated since the last
    call (an OpenAI server's chunks), `update()` every id so far plus the backend's finish reason
    (TensorRT-LLM's CompletionOutput.token_ids, not a diff; None while running). Either way each id
    goes through our detokenizer (never half a UTF-8 character) and stop-string filter (exact on
    text); an eos id ends the reply unless ignore_eos, and `max_tokens` ends it with "length" even
    if the backend would go on. After the "finished" event every call returns nothing; the caller
    then stops the backend's request if it is still running.

    `measure_queue`: whether the time from `submitted` to `started()` is reported as queue_ms.
    False for a remote server: the wait before it answers (its queue, the network, prefill) cannot be
    split here, so queue_ms stays 0 and first_token_ms holds it.
    """

    def __init__(self, request_id: str, prompt_tokens: int, params: SamplingParams, max_tokens: int,
                 detokenizer: Detokenizer, eos_ids: Sequence[int], submitted: float | None = None, *,
                 measure_queue: bool = True):
        self.request_id, self.prompt_tokens, self.max_tokens = request_id, prompt_tokens, max_tokens
        self.detokenizer = detokenizer
        self.stops = StopStringFilter(params.stop)
        self.eos = frozenset(() if params.ignore_eos else eos_ids)
        self.output: list[int] = []
        self.text = ""
        self.finished = False
        self.submitted = submitted if submitted is not None else time.perf_counter()
        self.measure_queue = measure_queue
        self.started_at = 0.0
        self.first_token = 0.0
        self._pending: list[int] = []  # ids whose text is not streamed yet

    def started(self) -> EngineEvent:
        self.started_at = time.perf_counter()
        return EngineEvent("started", self.request_id, prompt_tokens=self.prompt_tokens,
                           queue_ms=self.timings()["queue_ms"])

    def tokens(self, ids: Sequence[int]) -> list[EngineEvent]:
        """Events for newly generated ids."""
        events: list[EngineEvent] = []
        for token in ids:
            if self.finished:
                break
            self.first_token = self.first_token or time.perf_counter()
            if token in self.eos:
                return events + self.finish("stop")
            self.output.append(token)
            self._pending.append(token)
            events += self._push(self.detokenizer.push(token))
            if not self.finished and len(self.output) >= self.max_tokens:
                events += self.finish("length")
        return events

    def update(self, token_ids: Sequence[int], finish_reason: str | None) -> list[EngineEvent]:
        """Events for every id generated so far (those already taken are skipped), then the end if
        the backend reports one."""
        if self.finished:
            return []
        # Until the reply has finished, every id taken is in self.output (an eos id finishes it).
        events = self.tokens(token_ids[len(self.output):])
        if finish_reason is not None:
            events += self.finish(engine_reason(finish_reason))
        return events

    def cancel(self) -> list[EngineEvent]:
        """Ends the reply as cancelled with the text streamed so far (held-back text is dropped)."""
        return self.finish("cancelled")

    def finish(self, reason: str, stop_string: bool = False) -> list[EngineEvent]:
        """Ends the reply (nothing if it has ended): "stop" and "length" release the text held back
        for a possible stop string, as LLMEngine._finish does; "cancelled" drops it."""
        if self.finished:
            return []
        events = []
        if reason in ("stop", "length") and not stop_string:
            tail, hit = self.stops.push(self.detokenizer.flush())
            tail += "" if hit else self.stops.flush()
            if tail:
                events.append(self._delta(tail))
        self.finished = True
        events.append(EngineEvent("finished", self.request_id, text=self.text, token_ids=tuple(self.output),
                                  finish_reason=reason, prompt_tokens=self.prompt_tokens, **self._usage(),
                                  **self.timings()))
        return events

    def timings(self) -> dict[str, float]:
        now = time.perf_counter()
        queued = ((self.started_at or now) - self.submitted) * 1000 if self.measure_queue else 0.0
        return {"queue_ms": queued, "first_token_ms": ((self.first_token or now) - self.submitted) * 1000,
                "total_ms": (now - self.submitted) * 1000}

    def _usage(self) -> dict[str, int]:
        """The finished event's token counts; a backend that reports its own overrides this."""
        return {"completion_tokens": len(self.output)}

    def _push(self, piece: str) -> list[EngineEvent]:
        out, hit = self.stops.push(piece)
        events = [self._delta(out)] if out else []
        return events + (self.finish("stop", stop_string=True) if hit else [])

    def _delta(self, text: str) -> EngineEvent:
        self.text += text
        event = EngineEvent("delta", self.request_id, text=text, token_ids=tuple(self._pending))
        self._pending.clear()
        return event
