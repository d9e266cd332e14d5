"""The OpenAI API's JSON as our HTTP endpoint reads and writes it (server/openai_http.py): errors,
request fields checked as gRPC's options are (server/requests.py), and the shapes of replies."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from sidecar.engine.api import QueueFull
from sidecar.server.requests import check_sampling_number, check_whole_number

ROLES = ("system", "user", "assistant")
FINISH = {"stop": "stop", "length": "length", "cancelled": "abort"}


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> web.Response:
        return web.json_response({"error": self.body()}, status=self.status)

    def body(self) -> dict:
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}


def refusal(e: Exception) -> HttpError:
    """A queue that is full (429) or a backend that cannot answer (503)."""
    if isinstance(e, QueueFull):
        return HttpError(429, f"{e}; retry after a short backoff", "rate_limit_error", "queue_full")
    return HttpError(503, str(e), "server_error", "backend_unavailable")


class Shape:
    """The JSON of one reply, as completions or chat completions shape it."""

    def __init__(self, request_id: str, model: str, chat: bool, with_ids: bool):
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model, self.chat, self.with_ids = model, chat, with_ids
        self.created = int(time.time())
        self.first = True

    def _envelope(self, kind: str, choices: list, **extra: Any) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def chunk(self, text: str, finish: str | None, token_ids: tuple[int, ...], **extra: Any) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if self.first else {"content": text} if text else {}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if self.with_ids:
            choice["token_ids"] = list(token_ids)
        self.first = False
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [{**choice, **extra}])

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage)

    def whole(self, text: str, reason: str | None, token_ids: tuple[int, ...], usage: dict, **extra: Any) -> dict:
        finish = FINISH.get(reason or "stop", "stop")
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if self.with_ids:
            choice["token_ids"] = list(token_ids)
        return self._envelope("chat.completion" if self.chat else "text_completion", [{**choice, **extra}],
                              usage=usage)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


async def send(response: web.StreamResponse, data: dict) -> None:
    await response.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")


async def json_body(request: web.Request) -> dict:
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object")
    return body


def message(message: Any, i: int) -> tuple[str, str]:
    """(role, content) of messages[i]; content parts may only be text."""
    where = f"messages[{i}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise HttpError(400, f"{where}: an object with role one of {', '.join(ROLES)}", param=where)
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise HttpError(400, f"{where}.content: only text parts are supported", param=where)
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise HttpError(400, f"{where}.content: a string", param=where)
    return message["role"], content


def number(body: dict, name: str, default: float | None) -> float | None:
    """A sampling number of the body (server/requests.py's range for `name`), or `default` when absent."""
    value = body.get(name)
    return default if value is None else check_sampling_number(name, name, value)


def whole(body: dict, name: str, default: int | None, low: int, high: int, low_means: str = "") -> int | None:
    """A whole-number parameter of the body from low to high, or `default` when absent or null."""
    value = body.get(name)
    return default if value is None else check_whole_number(name, value, low, high, low_means)


def max_tokens_field(body: dict, chat: bool) -> str:
    return "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"


def check_common(body: dict) -> None:
    """Fields no reply of ours supports in another form."""
    if body.get("n", 1) != 1:
        raise HttpError(400, "n: only 1 is supported", param="n")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise HttpError(400, "logprobs: only prompt log-probabilities (echo with max_tokens 0) are supported",
                        param="logprobs")


def stop_list(body: dict) -> list:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list):
        raise HttpError(400, "stop: a string or a list of strings", param="stop")
    return stops

