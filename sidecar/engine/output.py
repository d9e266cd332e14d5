"""Sampled token ids -> a request's events: the one place where a reply is cut and spelled.

Every backend feeds each request through a `RequestOutput`: a reply's ids (the torch engine one
per step, a remote server or TensorRT-LLM as they report them), or a scoring request's
log-probabilities. Each id goes through the detokenizer (never half a UTF-8 character) and the
stop-string filter (exact on text); an eos id ends the reply unless ignore_eos, max_tokens ends it
with "length". So a reply reads the same, and is timed the same, on every backend. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.engine.api import EngineEvent, SamplingParams, Timings
from sidecar.engine.tokenizer import Detokenizer


def engine_reason(reported: str | None) -> str:
    """Our finish reason for one a backend reports: "stop" and "length" as they are; anything else
    (TensorRT-LLM's "timeout", a server's "abort") ended the reply early, which is "cancelled"."""
    return reported if reported in ("stop", "length") else "cancelled"


class StopStringFilter:
    """Streams text but holds back what could be the start of a stop string; finds the first stop."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.text = ""  # everything decoded so far
        self.emitted = 0  # how much of `text` has been released

    def push(self, piece: str) -> tuple[str, bool]:
        """Adds decoded text; returns (text safe to emit now, whether a stop string was hit)."""
        self.text += piece
        if not self.stops:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out, False
        # Search only where a new match can be: from the first unreleased character on.
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.emitted:end] if end > self.emitted else ""
            self.text, self.emitted = self.text[:end], end
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        safe = len(self.text) - hold
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


class RequestOutput:
    """One request's events: a reply's ids so far and its text, or a scoring request's result.

    `tokens(ids)` takes ids generated since the last call; `update(ids, reason)` every id so far plus
    the backend's finish reason (TensorRT-LLM reports it so; None while running). After the finished
    event every call returns nothing; the caller then stops the backend's request if it still runs.
    """

    def __init__(self, request_id: str, prompt_tokens: int, params: SamplingParams, max_tokens: int,
                 detokenizer: Detokenizer, eos_ids: Sequence[int], timings: Timings, forced: Sequence[int] = ()):
        self.request_id, self.prompt_tokens, self.max_tokens = request_id, prompt_tokens, max_tokens
        self.detokenizer = detokenizer
        self.stops = StopStringFilter(params.stop)
        self.eos = frozenset(() if params.ignore_eos else eos_ids)
        self.timings = timings
        self.output: list[int] = []  # reply ids (an eos that ended it is not one)
        self.text = ""  # the reply as streamed so far
        self.cached_tokens = 0  # prompt tokens whose K/V were reused (set by started())
        self.finished = False
        self._pending: list[int] = []  # ids whose text is not streamed yet
        # A grammar's fixed opening, prefilled with the prompt: the reply's first ids (completion tokens,
        # not prompt_tokens), streamed with the first sampled one.
        self._forced = list(forced)

    def started(self, cached_tokens: int = 0) -> EngineEvent:
        """The request got its place in the batch."""
        self.timings.mark_started()
        self.cached_tokens = cached_tokens
        return EngineEvent("started", self.request_id, prompt_tokens=self.prompt_tokens, cached_tokens=cached_tokens,
                           **self.timings.ms())

    def tokens(self, ids: Sequence[int]) -> list[EngineEvent]:
        """Events for newly generated ids."""
        events: list[EngineEvent] = []
        if self._forced:
            ids, self._forced = [*self._forced, *ids], []
        for token in ids:
            if self.finished:
                break
            if token in self.eos:
                return events + self.finish("stop")
            self.output.append(token)
            self._pending.append(token)
            events += self._push(self.detokenizer.push(token))
            if not self.finished and len(self.output) >= self.max_tokens:
                events += self.finish("length")
        return events

    def update(self, token_ids: Sequence[int], finish_reason: str | None) -> list[EngineEvent]:
        """Events for every id generated so far (those already taken are skipped), then the end if the
        backend reports one."""
        if self.finished:
            return []
        # Until the reply has finished, every id taken is in self.output (an eos id finishes it).
        events = self.tokens(token_ids[len(self.output):])
        if finish_reason is not None:
            events += self.finish(engine_reason(finish_reason))
        return events

    def text_piece(self, piece: str) -> list[EngineEvent]:
        """Events for decoded text: a backend that streams text without ids feeds it here."""
        return [] if self.finished or not piece else self._push(piece)

    def _push(self, piece: str) -> list[EngineEvent]:
        out, hit = self.stops.push(piece)
        events = [self._delta(out)] if out else []
        return events + (self.finish("stop", stop_string=True) if hit else [])

    def cancel(self) -> list[EngineEvent]:
        """Ends the reply as cancelled with the text streamed so far (held-back text is dropped)."""
        return self.finish("cancelled")

    def finish(self, reason: str, stop_string: bool = False) -> list[EngineEvent]:
        """Ends the reply (nothing if it has ended): "stop" and "length" release the text held back for
        a possible stop string; "cancelled" drops it."""
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
                                  finish_reason=reason, prompt_tokens=self.prompt_tokens, **self.usage(),
                                  **self.timings.ms()))
        return events

    def choice(self, token_logprobs: Sequence[Sequence[float]]) -> EngineEvent:
        """Ends a scoring request: each candidate's log-probability is the sum of its tokens' own, and
        the choice is the likeliest candidate (the first of equals)."""
        self.finished = True
        scores = tuple(float(sum(values)) for values in token_logprobs)
        return EngineEvent("finished", self.request_id, finish_reason="choice", prompt_tokens=self.prompt_tokens,
                           cached_tokens=self.cached_tokens, choice=max(range(len(scores)), key=scores.__getitem__),
                           choice_logprobs=scores,
                           choice_token_logprobs=tuple(tuple(map(float, v)) for v in token_logprobs),
                           **self.timings.ms())

    def error(self, message: str, internal: bool = False) -> EngineEvent:
        """Ends the reply with an error (an unusable adapter, a remote's refusal; internal: a bug)."""
        self.finished = True
        return EngineEvent("error", self.request_id, finish_reason="error", error=message, internal=internal,
                           prompt_tokens=self.prompt_tokens, **self.timings.ms())

    def usage(self) -> dict[str, int]:
        """The finished event's token counts; a backend that reports its own overrides this."""
        return {"cached_tokens": self.cached_tokens, "completion_tokens": len(self.output)}

    def _delta(self, text: str) -> EngineEvent:
        self.timings.mark_first_text()
        self.text += text
        event = EngineEvent("delta", self.request_id, text=text, token_ids=tuple(self._pending))
        self._pending.clear()
        return event

