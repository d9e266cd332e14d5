"""`npc serve --openai-listen HOST:PORT`: the same engine behind an OpenAI-compatible HTTP API.

So one `npc serve` can be the model server of another (`npc serve --backend remote`), and tools
that speak the OpenAI API can reach the characters' adapters. Thin like service.py: JSON in,
engine calls, JSON / server-sent events out. Served:

- GET  /v1/models: "base" (no adapter) first, then one model per character that can serve;
- POST /v1/completions: `prompt` a string (control tokens honoured, as `npc generate --raw`) or
  a list of token ids (used as they are: exact, and nothing in them is re-read as text);
  `stream` as SSE `data: {...}` chunks ending with `data: [DONE]`; `return_token_ids` (vLLM's
  name) adds each chunk's token ids; `echo` with `max_tokens: 0` and `logprobs` scores the prompt
  (see ECHO_LOGPROB_TOKENS);
- POST /v1/chat/completions: `messages` through the model's chat template, contents literal.

`model` picks the character whose adapter (and lora_scale) is used, and whose
generation.max_tokens_limit caps max_tokens (clamped, as over gRPC); the persona is not added: the
caller's prompt is the whole prompt. Sampling: max_tokens, temperature, top_p, top_k,
repetition_penalty, seed, stop, ignore_eos, checked by server/requests.py as gRPC's options are.
Errors are OpenAI-shaped JSON, `{"error": {"message", "type", "param", "code"}}`: 400 bad input,
401 without the server's --auth-token as `Authorization: Bearer`, 404 unknown model or path, 429
queue full, 503 draining.
A client that disconnects cancels its request in the engine (aiohttp cancels the handler).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from sidecar.backends import BackendUnavailable
from sidecar.config import ServerConfig, parse_listen
from sidecar.dialogue.characters import Generation
from sidecar.dialogue.registry import CharacterRegistry, CharacterUnavailable, UnknownCharacter
from sidecar.engine.engine import QueueFull
from sidecar.engine.sampler import SamplingParams
from sidecar.engine.sequence import AdapterRef, EngineEvent
from sidecar.engine.tokenizer import ChatMessage
from sidecar.errors import UserError
from sidecar.server.requests import (
    InvalidArgument,
    check_sampling_number,
    check_stops,
    check_whole_number,
    reply_token_cap,
)

log = structlog.get_logger("sidecar.server")

BASE_MODEL = "base"
# Prompt log-probabilities (echo) are computed for at most this many final prompt tokens; earlier
# positions are null. Enough to score a short continuation (an emotion label), and cheap: the
# engine scores the tail's prefixes as choices instead of keeping logits for the whole prompt.
# Each value is the difference of two such scores, so it carries their rounding (about 0.01 at
# int4; a near-certain token can show a small positive value); sums over the tail's end are as
# exact as the engine's own choice scores.
ECHO_LOGPROB_TOKENS = 8
MAX_BODY_BYTES = 4 * 1024 * 1024
ROLES = ("system", "user", "assistant")
FINISH = {"stop": "stop", "length": "length", "cancelled": "abort"}


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                             "code": self.code}}, status=self.status)


@dataclass(frozen=True)
class _Model:
    """What a request's `model` names: the base model, or a character's adapter and reply cap."""

    name: str
    adapter: AdapterRef | None = None
    generation: Generation | None = None  # the character's: its max_tokens_limit caps replies


class OpenAiEndpoint:
    def __init__(self, engine: Any, registry: CharacterRegistry, adapters: Any, config: ServerConfig,
                 accepting: Callable[[], bool] = lambda: True):
        self.engine, self.registry, self.adapters, self.config = engine, registry, adapters, config
        self.limits = config.limits
        self.accepting = accepting
        self._runner: web.AppRunner | None = None
        self.replies: dict[str, Any] = {}  # streams in flight, by request id: cancelled at stop()

    # --- lifecycle ----------------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_and_auth], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    async def start(self, listen: str) -> str:
        """Listens on HOST:PORT (port 0: any free one); returns the address bound."""
        host, port = parse_listen("--openai-listen", listen)
        # handler_cancellation: a client that hangs up cancels its handler, which cancels its sequence.
        self._runner = web.AppRunner(self.application(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host.strip("[]"), port).start()
        except OSError as e:
            await self._runner.cleanup()
            raise UserError(f"--openai-listen: cannot listen on {listen} ({e.strerror or e})") from None
        bound = self._runner.addresses[0]
        return f"{host}:{bound[1]}"

    async def stop(self) -> None:
        """Cancels replies still streaming (after the server's grace period), then closes the socket."""
        for reply in list(self.replies.values()):
            reply.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _errors_and_auth(self, request: web.Request, handler) -> web.StreamResponse:
        token = self.config.auth_token
        if token:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {token}".encode()):
                return HttpError(401, "missing or wrong `Authorization: Bearer` token", "authentication_error",
                                 "invalid_api_key").response()
        try:
            return await handler(request)
        except (QueueFull, BackendUnavailable) as e:  # a remote backend refusing mid-call
            return _refusal(e).response()
        except HttpError as e:
            return e.response()
        except web.HTTPException as e:  # unknown path, wrong method, body too large: JSON too
            return HttpError(e.status, e.reason, "invalid_request_error", None).response()

    # --- handlers -----------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        names = [BASE_MODEL] + [s.id for s in self.registry.list() if s.serving]
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "npc-sidecar",
             "max_model_len": self.engine.config.max_seq_len} for name in names]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model = self._model(body)
        ids = self._prompt_ids(body.get("prompt"))
        if body.get("echo"):
            return await self._echo(body, model, ids)
        return await self._generate(request, body, model, ids, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model = self._model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HttpError(400, "messages: required, a non-empty list", param="messages")
        chat = [ChatMessage(*_message(m, i)) for i, m in enumerate(messages)]
        try:
            ids = self.engine.base.tokenizer.encode_chat(chat)
        except UserError as e:
            raise HttpError(400, str(e), param="messages") from None
        return await self._generate(request, body, model, ids, chat=True)

    # --- parts --------------------------------------------------------------------------------

    def _model(self, body: dict) -> _Model:
        if not self.accepting():
            raise HttpError(503, "the sidecar is shutting down", "server_error", "shutting_down")
        model = body.get("model", BASE_MODEL)
        if not isinstance(model, str) or not model:
            raise HttpError(400, "model: must be a non-empty string", param="model")
        if model == BASE_MODEL:
            return _Model(model)
        try:
            character = self.registry.get(model)
        except UnknownCharacter:
            raise HttpError(404, f"model {model[:64]!r} not found; GET /v1/models lists them", code="model_not_found",
                            param="model") from None
        except CharacterUnavailable as e:
            raise HttpError(400, str(e), code="model_unavailable", param="model") from None
        return _Model(model, self.adapters.ref(character), character.generation)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            return self.engine.base.tokenizer.encode_raw_prompt(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise HttpError(400, "prompt: a non-empty string or a non-empty list of token ids (one prompt per request)",
                        param="prompt")

    def _sampling(self, body: dict, chat: bool, generation: Generation | None = None) -> SamplingParams:
        """The body's sampling parameters, checked as gRPC's options are (server/requests.py) under their
        OpenAI names; max_tokens is clamped to the character's max_tokens_limit (`generation`)."""
        if body.get("n", 1) != 1:
            raise HttpError(400, "n: only 1 is supported", param="n")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise HttpError(400, "ignore_eos: true or false", param="ignore_eos")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not isinstance(stops, list):
            raise HttpError(400, "stop: a string or a list of strings", param="stop")
        name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        try:
            return SamplingParams(
                max_tokens=min(_whole(body, name, 16, 1, self.limits.max_tokens),
                               reply_token_cap(self.limits, generation)),
                temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
                top_k=max(_whole(body, "top_k", 0, -1, 1_000_000, " (no limit)"), 0),
                repetition_penalty=_number(body, "repetition_penalty", 1.0),
                stop=check_stops("stop", stops, self.limits), seed=_whole(body, "seed", None, 0, 2**63 - 1),
                ignore_eos=ignore_eos)
        except InvalidArgument as e:
            raise HttpError(400, str(e), param=e.param) from None
        except UserError as e:  # SamplingParams' own checks
            raise HttpError(400, str(e)) from None

    def _submit(self, ids: list[int], adapter: AdapterRef | None, sampling: SamplingParams,
                choices: list[list[int]] | None = None):
        try:
            return self.engine.submit(ids, adapter, sampling, choices=choices)
        except QueueFull as e:
            raise _refusal(e) from None
        except UserError as e:
            raise HttpError(400, str(e), param="prompt") from None

    async def _generate(self, request: web.Request, body: dict, model: _Model, ids: list[int],
                        chat: bool) -> web.StreamResponse:
        sampling = self._sampling(body, chat, model.generation)
        if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
            raise HttpError(400, "logprobs: only prompt log-probabilities (echo with max_tokens 0) are supported",
                            param="logprobs")
        stream_options = body.get("stream_options") or {}
        usage_chunk = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        with_ids = body.get("return_token_ids") is True
        reply = self._submit(ids, model.adapter, sampling)
        shape = _Shape(reply.request_id, model.name, chat, with_ids)
        bound = log.bind(request_id=reply.request_id, model=model.name, api="chat" if chat else "completions")
        finished: EngineEvent | None = None
        response: web.StreamResponse | None = None
        self.replies[reply.request_id] = reply
        try:
            if body.get("stream") is not True:
                async for event in reply:
                    if event.kind in ("finished", "error"):
                        finished = event
                if finished is not None and finished.kind == "error":
                    raise _engine_error(finished)
                return web.json_response(shape.whole(finished))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            async for event in _refusals_as_errors(reply):
                if event.kind == "delta":
                    await _send(response, shape.chunk(event.text, None, event.token_ids))
                elif event.kind == "started":
                    continue
                elif event.kind == "error":
                    await _send(response, {"error": {"message": event.error, "type": "server_error",
                                                     "param": None, "code": None}})
                    finished = event
                else:
                    finished = event
                    await _send(response, shape.chunk("", FINISH.get(event.finish_reason, "stop"), ()))
                    if usage_chunk:
                        await _send(response, shape.usage_chunk(event))
            await response.write(b"data: [DONE]\n\n")
            return response
        except ConnectionError:  # the client hung up while we wrote (the handler may not be cancelled yet)
            if response is None:
                raise
            return response
        finally:
            self.replies.pop(reply.request_id, None)
            if finished is None:  # the client hung up (the handler is cancelled) or an error left early
                reply.cancel()
                bound.info("http reply cancelled by the client")
            else:
                bound.info("http reply", reason=finished.finish_reason, prompt_tokens=finished.prompt_tokens,
                           completion_tokens=finished.completion_tokens)

    async def _echo(self, body: dict, model: _Model, ids: list[int]) -> web.Response:
        """The prompt's token log-probabilities, without generating (vLLM: echo with max_tokens 0)."""
        if body.get("max_tokens") != 0 or body.get("stream") is True:
            raise HttpError(400, "echo: only with max_tokens 0 and without stream (prompt scoring)", param="echo")
        tail = min(len(ids) - 1, ECHO_LOGPROB_TOKENS)
        values: list[float | None] = [None] * (len(ids) - tail)
        if tail > 0:
            # Each prefix of the tail is a choice; their summed scores differ by one token's log-probability.
            last = ids[-tail:]
            reply = self._submit(ids[:-tail], model.adapter, SamplingParams(max_tokens=1),
                                 choices=[last[:i] for i in range(1, tail + 1)])
            scores: tuple[float, ...] = ()
            async for event in reply:
                if event.kind == "error":
                    raise _engine_error(event)
                if event.kind == "finished":
                    scores = event.choice_logprobs
            if len(scores) != tail:
                raise HttpError(500, "prompt scoring was cancelled", "server_error")
            values += [scores[0]] + [scores[i] - scores[i - 1] for i in range(1, tail)]
        tok = self.engine.base.tokenizer
        logprobs = {"tokens": [tok.decode([t]) for t in ids], "token_logprobs": values,
                    "top_logprobs": [None] * len(ids), "text_offset": None}
        return web.json_response({
            "id": f"cmpl-echo-{time.monotonic_ns()}", "object": "text_completion", "created": int(time.time()),
            "model": model.name, "choices": [{"index": 0, "text": tok.decode(ids), "logprobs": logprobs,
                                              "finish_reason": "length", "prompt_token_ids": ids}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}})


class _Shape:
    """The JSON of one reply, as completions or chat completions shape it."""

    def __init__(self, request_id: str, model: str, chat: bool, with_ids: bool):
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model, self.chat, self.with_ids = model, chat, with_ids
        self.created = int(time.time())
        self.first = True

    def _envelope(self, kind: str, choices: list, **extra: Any) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def chunk(self, text: str, finish: str | None, token_ids: tuple[int, ...]) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if self.first else {"content": text} if text else {}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if self.with_ids:
            choice["token_ids"] = list(token_ids)
        self.first = False
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self, finished: EngineEvent) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=_usage(finished))

    def whole(self, finished: EngineEvent | None) -> dict:
        if finished is None:
            raise HttpError(500, "the reply was cancelled", "server_error")
        reason = FINISH.get(finished.finish_reason, "stop")
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": finished.text},
                                      "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": finished.text, "logprobs": None, "finish_reason": reason}
        if self.with_ids:
            choice["token_ids"] = list(finished.token_ids)
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice],
                              usage=_usage(finished))


def _refusal(e: Exception) -> HttpError:
    if isinstance(e, QueueFull):
        return HttpError(429, f"{e}; retry after a short backoff", "rate_limit_error", "queue_full")
    return HttpError(503, str(e), "server_error", "backend_unavailable")


async def _refusals_as_errors(reply: Any) -> Any:
    """A stream's events; a remote backend's refusal raised once the SSE response has started (its
    status line is sent) becomes an error event, sent to the client as an error chunk."""
    try:
        async for event in reply:
            yield event
    except (QueueFull, BackendUnavailable) as e:
        yield EngineEvent("error", reply.request_id, finish_reason="error", error=_refusal(e).message)


def _usage(event: EngineEvent) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": event.cached_tokens}}


def _engine_error(event: EngineEvent) -> HttpError:
    if event.internal:
        return HttpError(500, event.error or "internal error", "server_error")
    return HttpError(400, event.error or "the request failed", code="adapter_error", param="model")


async def _send(response: web.StreamResponse, data: dict) -> None:
    await response.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")


async def _json_body(request: web.Request) -> dict:
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object")
    return body


def _message(message: Any, i: int) -> tuple[str, str]:
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


def _number(body: dict, name: str, default: float) -> float:
    """A sampling number of the body (server/requests.py's range for `name`), or its OpenAI default."""
    value = body.get(name)
    return default if value is None else check_sampling_number(name, name, value)


def _whole(body: dict, name: str, default: int | None, low: int, high: int, low_means: str = "") -> int | None:
    """A whole-number parameter of the body from low to high, or `default` when absent or null."""
    value = body.get(name)
    return default if value is None else check_whole_number(name, value, low, high, low_means)
