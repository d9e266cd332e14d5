"""The OpenAI API's JSON as our HTTP endpoint reads and writes it (server/openai_http.py): errors,
request fields checked as gRPC's options are (server/requests.py), and the shapes of replies."""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sidecar.engine.api import QueueFull
from sidecar.errors import UserError
from sidecar.server.requests import InvalidArgument, check_sampling_number, check_whole_number

ROLES = ("system", "developer", "user", "assistant", "tool")
FINISH = {"stop": "stop", "length": "length", "cancelled": "abort", "tool_calls": "tool_calls"}


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

    def chunk(self, text: str, finish: str | None, token_ids: tuple[int, ...], tool_calls: tuple[dict, ...] = (),
              **extra: Any) -> dict:
        """One streamed chunk; `tool_calls` (chat): calls as tool_call() makes them, each whole in one delta."""
        if self.chat:
            content = None if tool_calls and not text else text
            delta = {"role": "assistant", "content": content} if self.first else {"content": text} if text else {}
            if tool_calls:
                delta["tool_calls"] = list(tool_calls)
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if self.with_ids:
            choice["token_ids"] = list(token_ids)
        self.first = False
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [{**choice, **extra}])

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage)

    def whole(self, text: str, reason: str | None, token_ids: tuple[int, ...], usage: dict,
              tool_calls: tuple[dict, ...] = (), **extra: Any) -> dict:
        finish = FINISH.get(reason or "stop", "stop")
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": None if tool_calls and not text else text}
            if tool_calls:
                message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in tool_calls]
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
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


@dataclass(frozen=True)
class Message:
    """One entry of `messages`: role (developer reads as system), text, and an assistant's earlier calls."""

    role: str
    content: str
    calls: tuple[tuple[str, dict], ...] = ()  # an assistant message's tool_calls: (name, arguments)
    name: str | None = None
    emotion: str = ""  # an assistant message's `emotion` (what a character's reply carries)


def message(message: Any, i: int) -> Message:
    """messages[i], checked; content parts may only be text; an assistant message's `tool_calls` as
    OpenAI writes them (arguments a JSON object in a string), its content then optional."""
    where = f"messages[{i}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise HttpError(400, f"{where}: an object with role one of {', '.join(ROLES)}", param=where)
    role = "system" if message["role"] == "developer" else message["role"]
    calls = _calls(message.get("tool_calls"), where) if role == "assistant" else ()
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise HttpError(400, f"{where}.content: only text parts are supported", param=where)
        content = "".join(p["text"] for p in content)
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise HttpError(400, f"{where}.content: a string", param=where)
    name, emotion = message.get("name"), message.get("emotion")
    return Message(role, content, calls, name if isinstance(name, str) else None,
                   emotion if isinstance(emotion, str) else "")


def _calls(given: Any, where: str) -> tuple[tuple[str, dict], ...]:
    if given is None:
        return ()
    if not isinstance(given, list):
        raise HttpError(400, f"{where}.tool_calls: a list", param=where)
    calls = []
    for j, call in enumerate(given):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(name, str) or not isinstance(parsed, dict):
            raise HttpError(400, f'{where}.tool_calls[{j}]: {{"type": "function", "function": {{"name": ..., '
                                 '"arguments": "<a JSON object>"}}}}', param=where)
        calls.append((name, parsed))
    return tuple(calls)


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


def grammar(body: dict) -> str | None:
    """The grammar a body asks the reply to follow (Lark, llguidance's dialect), or None:
    `response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}
    (OpenAI), or `structured_outputs` {"grammar": LARK} or {"json": SCHEMA} (vLLM's name; what the
    remote backend sends)."""
    kind, value = content_format(body)
    return value if kind == "grammar" else json_grammar(value) if kind == "json" else None


def content_format(body: dict) -> tuple[str, Any]:
    """What the body asks the reply's text to be: ("text", None), ("json", SCHEMA) or ("grammar", LARK)."""
    fmt, structured = body.get("response_format"), body.get("structured_outputs")
    if fmt is not None and structured is not None:
        raise HttpError(400, "response_format and structured_outputs: give one of them", param="response_format")
    if structured is not None:
        if not isinstance(structured, dict) or len(structured) != 1 or not (
                isinstance(structured.get("grammar"), str) or isinstance(structured.get("json"), dict | bool)):
            raise HttpError(400, 'structured_outputs: {"grammar": "<lark>"} or {"json": <JSON schema>}',
                            param="structured_outputs")
        if "grammar" in structured:
            return "grammar", structured["grammar"]
        return "json", checked_schema(structured["json"], "structured_outputs")
    if fmt is None:
        return "text", None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return "text", None
    if kind == "json_object":
        return "json", {"type": "object"}
    schema = fmt.get("json_schema", {}).get("schema") if kind == "json_schema" and isinstance(
        fmt.get("json_schema"), dict) else None
    if not isinstance(schema, dict):
        raise HttpError(400, 'response_format: {"type": "text"}, {"type": "json_object"} or {"type": '
                             '"json_schema", "json_schema": {"name": ..., "schema": {...}}}', param="response_format")
    return "json", checked_schema(schema, "response_format")


def checked_schema(schema: dict | bool, param: str) -> dict | bool:
    problem = schema_problem(schema)
    if problem:
        raise HttpError(400, f"{param}: {problem}", param=param)
    return schema


def json_grammar(schema: dict | bool) -> str:
    """A Lark grammar whose whole text is one JSON value matching `schema`."""
    return "start: %json" + json.dumps(schema, ensure_ascii=False) + "\n"


def schema_problem(schema: dict | bool) -> str | None:
    """Why llguidance (the engine's grammar library) cannot compile `schema`; None: it can."""
    import llguidance  # lazily: only requests with a schema need it

    error = llguidance.LLMatcher.validate_grammar(json_grammar(schema))
    if not error:
        return None
    first = error.strip().splitlines()[0]
    return re.sub(r"^at \d+\(\d+\): ", "", first)


# --- entities (a character's turn) ------------------------------------------------------------------

def entities(body: dict) -> dict[str, tuple[str, ...]]:
    """The body's `entities` ({"stock": ["iron sword", ...]}), shape-checked; the turn checks names,
    values and limits (dialogue/actions.py check_entities)."""
    given = body.get("entities")
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise HttpError(400, 'entities: an object of lists of strings, e.g. {"stock": ["iron sword"]}',
                        param="entities")
    for name, values in given.items():
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise HttpError(400, f"entities[{name[:32]!r}]: a list of strings", param="entities")
    return {name: tuple(values) for name, values in given.items()}


def stop_list(body: dict) -> list:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list):
        raise HttpError(400, "stop: a string or a list of strings", param="stop")
    return stops


@contextlib.contextmanager
def as_http_error():
    """The checks shared with gRPC raise InvalidArgument (or SamplingParams' UserError): 400 here."""
    try:
        yield
    except InvalidArgument as e:
        raise HttpError(400, str(e), param=e.param) from None
    except UserError as e:
        raise HttpError(400, str(e)) from None
