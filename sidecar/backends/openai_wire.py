"""The OpenAI completions API as the remote backend speaks it (pure parts, unit-testable): the
request body, server-sent events, refusals, echo log-probabilities, and chunks -> engine events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp

from sidecar.engine.api import BackendUnavailable, EngineEvent, QueueFull, SamplingParams, Timings
from sidecar.engine.output import RequestOutput
from sidecar.engine.tokenizer import Tokenizer


class RemoteRefused(Exception):
    """The remote answered 4xx other than 429: no such model, or a request it will not run."""


def completion_body(prompt_ids: list[int], model: str, params: SamplingParams, max_tokens: int) -> dict[str, Any]:
    """A streamed /v1/completions request for a reply. Fields beyond OpenAI's (top_k, min_p, repetition_penalty,
    ignore_eos, return_token_ids) are vLLM's names, sent only when they change something or help."""
    body: dict[str, Any] = {"model": model, "prompt": list(prompt_ids), "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}, "return_token_ids": True,
                            "temperature": params.temperature, "top_p": params.top_p}
    if params.seed is not None:
        body["seed"] = params.seed
    if params.top_k:
        body["top_k"] = params.top_k
    if params.min_p:
        body["min_p"] = params.min_p
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = params.repetition_penalty
    if params.ignore_eos:
        body["ignore_eos"] = True
    if params.grammar is not None:  # vLLM's field (Lark through its guidance backend); npc serve reads it too
        body["structured_outputs"] = {"grammar": params.grammar}
    return body


def candidate_logprobs(response: dict, prompt_len: int, candidate: list[int]) -> list[float]:
    """Each candidate token's log-probability from an echo response for prompt + candidate: the
    candidate positions' token_logprobs (their sum is log p(candidate | prompt))."""
    try:
        values = response["choices"][0]["logprobs"]["token_logprobs"][prompt_len:prompt_len + len(candidate)]
    except (KeyError, IndexError, TypeError):
        values = []
    if len(values) != len(candidate) or not all(isinstance(v, int | float) for v in values):
        raise RemoteRefused("the remote returned no prompt log-probabilities for the candidate "
                            "(needs echo + logprobs with max_tokens 0)")
    return [float(v) for v in values]


class ReplyEvents(RequestOutput):
    """A streamed reply's chunks -> our engine events (a RequestOutput with our tokenizer).

    `chunk()` takes each chunk: new token ids (exact: our detokenizer) or, when the remote sends no
    ids, new text; our stop-string filter runs on the text either way. The remote's usage comes in
    its last chunk, after its last token: `counted()` puts it (cached_tokens, and completion_tokens
    when it sent text without ids) into the finished event, which the caller holds back until then.
    """

    def __init__(self, request_id: str, prompt_tokens: int, params: SamplingParams, max_tokens: int,
                 tokenizer: Tokenizer, timings: Timings):
        super().__init__(request_id, prompt_tokens, params, max_tokens, tokenizer.detokenizer(), tokenizer.eos_ids,
                         timings)
        self.pieces = 0  # text chunks received without ids
        self.remote_usage: dict = {}  # the remote's usage chunk, once it came
        self.reported: str | None = None  # the remote's finish reason, once it sent one
        self.stop_string = False  # ours ended the reply on a stop string, which the remote never sees
        self.outran = False  # the remote sent text after ours ended the reply: it does not end there

    def chunk(self, data: dict) -> list[EngineEvent]:
        """Events for one streamed chunk; notes the remote's finish reason and usage as they come."""
        if "error" in data:
            raise RuntimeError(f"the remote failed mid-reply: {str(data['error'])[:300]}")
        events: list[EngineEvent] = []
        for choice in data.get("choices") or ():
            ids, text = choice.get("token_ids"), choice.get("text", "")
            self.outran = self.outran or (self.finished and bool(ids or text) and not choice.get("finish_reason"))
            events += self.tokens(ids) if ids is not None else self.text_piece(text)
            self.reported = self.reported or choice.get("finish_reason")
        if isinstance(data.get("usage"), dict):
            self.remote_usage = data["usage"]
        return events

    @property
    def remote_ends_too(self) -> bool:
        """Ours ended the reply where the remote ends it too (eos or max_tokens: same prompt, sampling and
        max_tokens), so its usage chunk follows at once; after a stop string it would go on generating."""
        return self.finished and not self.stop_string and not self.outran

    def text_piece(self, piece: str) -> list[EngineEvent]:
        self.pieces += 0 if self.finished or not piece else 1
        return super().text_piece(piece)

    def finish(self, reason: str, stop_string: bool = False) -> list[EngineEvent]:
        self.stop_string = self.stop_string or (stop_string and not self.finished)
        return super().finish(reason, stop_string)

    def counted(self, finished: EngineEvent) -> EngineEvent:
        """The finished event with the counts of the remote's usage, read after our side ended the reply."""
        return replace(finished, **self.usage())

    def usage(self) -> dict[str, int]:
        cached = (self.remote_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        # Text without ids: the remote's count if it gave one, else one token a chunk (a guess).
        completion = (len(self.output) if self.output or not self.pieces
                      else self.remote_usage.get("completion_tokens", self.pieces))
        return {"cached_tokens": int(cached), "completion_tokens": int(completion)}


async def sse_data(content: aiohttp.StreamReader) -> AsyncIterator[dict]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    async for raw in content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments (": ping"), event names
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        try:
            data = json.loads(payload)
        except ValueError:
            raise BackendUnavailable(f"the remote sent a malformed event: {payload[:80]!r}") from None
        if isinstance(data, dict):
            yield data


async def refusal(response: aiohttp.ClientResponse, model: str) -> Exception:
    """The exception for a non-200 answer."""
    raw = await response.content.read(4096)
    try:
        message = str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = raw.decode(errors="replace").strip()
    message = message[:300] or response.reason or ""
    status = response.status
    if status == 429:
        return QueueFull(f"the remote model server is busy (HTTP 429: {message}); retry after a short backoff")
    if status == 404:
        return RemoteRefused(f"the remote serves no model {model!r} (HTTP 404: {message}); register the adapter "
                             f"under that name there (vLLM: --lora-modules {model}=PATH)")
    if status in (401, 403):
        return BackendUnavailable(f"the remote refused the API key (HTTP {status}); check --remote-api-key")
    if 400 <= status < 500:
        return RemoteRefused(f"the remote refused the request (HTTP {status}: {message})")
    return BackendUnavailable(f"the remote model server failed (HTTP {status}: {message})")
