"""`npc serve --openai-listen HOST:PORT`: the same characters and engine behind an OpenAI-compatible HTTP API.

So one `npc serve` can be the model server of another (`npc serve --backend remote`), and tools
that speak the OpenAI API can talk to the characters. Thin like service.py: JSON in, dialogue
calls, JSON / server-sent events out (shapes: server/openai_json.py). Served:

- GET  /v1/models: "base" (no adapter) first, then one model per character that can serve;
- POST /v1/completions: `prompt` a string (control tokens honoured, as `npc generate --raw`) or
  a list of token ids (used as they are: exact, and nothing in them is re-read as text); `model`
  picks the character whose adapter (and lora_scale) is used, and whose
  generation.max_tokens_limit caps max_tokens (clamped, as over gRPC): the caller's prompt is the
  whole prompt. `stream` as SSE `data: {...}` chunks ending with `data: [DONE]`;
  `return_token_ids` (vLLM's name) adds each chunk's token ids; `echo` with `max_tokens: 0` and
  `logprobs` scores the prompt (see ECHO_LOGPROB_TOKENS);
- POST /v1/chat/completions: with `model` "base", `messages` go through the model's chat template,
  contents literal. With a character, it is that character's turn, as gRPC Talk makes it
  (dialogue/turn.py): its persona, knowledge and adapter; the last message is the player's line
  (role user, its `name` the player's name), earlier user / assistant messages are the history,
  system messages are the situation (a world fact); sampling fields left out take the character's
  defaults, and the reply carries the character's `emotion` label (an extra field of the choice,
  in the last chunk when streamed). No server session is read or written: the messages are the
  conversation.

Sampling: max_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, ignore_eos,
checked by server/requests.py as gRPC's options are. Errors are OpenAI-shaped JSON,
`{"error": {"message", "type", "param", "code"}}`: 400 bad input, 401 without the server's
--auth-token as `Authorization: Bearer`, 404 unknown model or path, 429 queue full, 503 draining.
A client that disconnects cancels its request in the engine (aiohttp cancels the handler).
"""

from __future__ import annotations

import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from sidecar.config import ServerConfig, parse_listen
from sidecar.dialogue.characters import Character, Generation
from sidecar.dialogue.registry import CharacterUnavailable, UnknownCharacter
from sidecar.dialogue.sessions import Turn
from sidecar.dialogue.turn import (
    Dialogue,
    ReplyFailed,
    Request,
    ShuttingDown,
    TalkInput,
    TurnDelta,
    TurnFinished,
    reply_token_cap,
)
from sidecar.engine.api import AdapterRef, BackendUnavailable, EngineEvent, QueueFull, SamplingParams
from sidecar.engine.tokenizer import ChatMessage
from sidecar.errors import UserError
from sidecar.server import openai_json as oj
from sidecar.server.openai_json import HttpError
from sidecar.server.requests import InvalidArgument, check_stops

log = structlog.get_logger("sidecar.server")

BASE_MODEL = "base"
# Prompt log-probabilities (echo) are computed for at most this many final prompt tokens; earlier
# positions are null. Enough to score a short continuation (an emotion label), and cheap: the
# engine scores the tail as one candidate continuation instead of keeping logits for the whole
# prompt. Each value comes from one log-softmax (so it is never above 0).
ECHO_LOGPROB_TOKENS = 8
MAX_BODY_BYTES = 4 * 1024 * 1024
WORLD_KEY = "situation"  # the world fact a chat's system messages become


@dataclass(frozen=True)
class _Model:
    """What a request's `model` names: the base model, or a character with its adapter."""

    name: str
    character: Character | None = None
    adapter: AdapterRef | None = None

    @property
    def generation(self) -> Generation | None:
        return self.character.generation if self.character is not None else None


@dataclass(frozen=True)
class _Part:
    """A reply as the JSON shapes need it: a piece of text, or the end."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    end: bool = False
    reason: str | None = None
    usage: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # fields of our own in the choice (a character's emotion)


class OpenAiEndpoint:
    def __init__(self, dialogue: Dialogue | None, config: ServerConfig):
        self.dialogue, self.config, self.limits = dialogue, config, config.limits
        self._runner: web.AppRunner | None = None

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
        """Closes the socket (replies in flight were cancelled by the server's drain: Dialogue.cancel_all)."""
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
        except (QueueFull, BackendUnavailable) as e:
            return oj.refusal(e).response()
        except ShuttingDown:
            return HttpError(503, "the sidecar is shutting down", "server_error", "shutting_down").response()
        except ReplyFailed as e:
            return _failure(e).response()
        except HttpError as e:
            return e.response()
        except web.HTTPException as e:  # unknown path, wrong method, body too large: JSON too
            return HttpError(e.status, e.reason, "invalid_request_error", None).response()

    # --- handlers -----------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        names = [BASE_MODEL] + [s.id for s in self.dialogue.registry.list() if s.serving]
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "npc-sidecar",
             "max_model_len": self.dialogue.engine.config.max_seq_len} for name in names]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await oj.json_body(request)
        model = self._model(body)
        ids = self._prompt_ids(body.get("prompt"))
        if body.get("echo"):
            return await self._echo(body, model, ids)
        return await self._generate(request, body, model, ids, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await oj.json_body(request)
        model = self._model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HttpError(400, "messages: required, a non-empty list", param="messages")
        chat = [ChatMessage(*oj.message(m, i)) for i, m in enumerate(messages)]
        if model.character is not None:
            return await self._turn(request, body, model, chat, messages[-1].get("name"))
        try:
            ids = self.dialogue.engine.model.tokenizer.encode_chat(chat)
        except UserError as e:
            raise HttpError(400, str(e), param="messages") from None
        return await self._generate(request, body, model, ids, chat=True)

    # --- parts --------------------------------------------------------------------------------

    def _model(self, body: dict) -> _Model:
        if not self.dialogue.accepting:
            raise ShuttingDown("the sidecar is shutting down")
        model = body.get("model", BASE_MODEL)
        if not isinstance(model, str) or not model:
            raise HttpError(400, "model: must be a non-empty string", param="model")
        if model == BASE_MODEL:
            return _Model(model)
        try:
            character, adapter = self.dialogue.serving(model)
        except UnknownCharacter:
            raise HttpError(404, f"model {model[:64]!r} not found; GET /v1/models lists them", code="model_not_found",
                            param="model") from None
        except CharacterUnavailable as e:
            raise HttpError(400, str(e), code="model_unavailable", param="model") from None
        return _Model(model, character, adapter)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            return self.dialogue.engine.model.tokenizer.encode_raw_prompt(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise HttpError(400, "prompt: a non-empty string or a non-empty list of token ids (one prompt per request)",
                        param="prompt")

    def _sampling(self, body: dict, chat: bool, generation: Generation | None = None) -> SamplingParams:
        """The body's sampling parameters, checked as gRPC's options are (server/requests.py) under their
        OpenAI names, with OpenAI's defaults; max_tokens is clamped to the character's max_tokens_limit."""
        oj.check_common(body)
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise HttpError(400, "ignore_eos: true or false", param="ignore_eos")
        with _as_http_error():
            return SamplingParams(
                max_tokens=min(oj.whole(body, oj.max_tokens_field(body, chat), 16, 1, self.limits.max_tokens),
                               reply_token_cap(self.limits, generation)),
                temperature=oj.number(body, "temperature", 1.0), top_p=oj.number(body, "top_p", 1.0),
                top_k=max(oj.whole(body, "top_k", 0, -1, 1_000_000, " (no limit)"), 0),
                repetition_penalty=oj.number(body, "repetition_penalty", 1.0),
                stop=check_stops("stop", oj.stop_list(body), self.limits),
                seed=oj.whole(body, "seed", None, 0, 2**63 - 1), ignore_eos=ignore_eos)

    async def _generate(self, request: web.Request, body: dict, model: _Model, ids: list[int],
                        chat: bool) -> web.StreamResponse:
        """A completion of the caller's prompt, under the model's adapter."""
        sampling = self._sampling(body, chat, model.generation)
        reply = self._submit(ids, model.adapter, sampling)
        bound = log.bind(request_id=reply.request_id, model=model.name, api="chat" if chat else "completions")
        shape = oj.Shape(reply.request_id, model.name, chat, body.get("return_token_ids") is True)
        try:
            return await self._respond(request, body, shape, _engine_parts(reply), bound)
        finally:
            reply.close()  # also when the response failed before reading any event

    def _submit(self, ids: list[int], adapter: AdapterRef | None, sampling: SamplingParams,
                choices: list[list[int]] | None = None) -> Request:
        try:
            return self.dialogue.submit(ids, adapter, sampling, choices=choices)
        except UserError as e:
            raise HttpError(400, str(e), param="prompt") from None

    async def _turn(self, request: web.Request, body: dict, model: _Model, chat: list[ChatMessage],
                    player_name: Any) -> web.StreamResponse:
        """A character's turn (dialogue/turn.py) from the messages."""
        talk = self._talk_input(body, model, chat, player_name)
        turn = self.dialogue.talk(talk, time.perf_counter())
        try:
            started = await anext(turn)  # refusals (queue full, prompt too long) come before the response
        except UserError as e:
            raise HttpError(400, str(e), param="messages") from None
        bound = log.bind(request_id=started.request_id, model=model.name, api="chat")
        shape = oj.Shape(started.request_id, model.name, True, with_ids=False)
        try:
            return await self._respond(request, body, shape, _turn_parts(turn), bound)
        finally:
            await turn.aclose()  # also when the response failed before reading on: cancels the reply

    def _talk_input(self, body: dict, model: _Model, chat: list[ChatMessage], player_name: Any) -> TalkInput:
        if chat[-1].role != "user" or not chat[-1].content.strip():
            raise HttpError(400, "messages: with a character, the last message is the player's line (role user, "
                                 "not empty)", param="messages")
        if body.get("ignore_eos"):
            raise HttpError(400, "ignore_eos: not for a character's turn", param="ignore_eos")
        oj.check_common(body)
        history, line, situation = [], "", []
        for m in chat[:-1]:
            if m.role == "system":
                situation.append(" ".join(m.content.split()))
            elif m.role == "user":
                line = f"{line}\n{m.content}" if line else m.content
            else:
                history.append(Turn(model.name, line, m.content))
                line = ""
        name = player_name if isinstance(player_name, str) else ""
        world = {WORLD_KEY: " ".join(situation)} if situation else {}
        for field_name, value, limit in (("messages[-1].content", chat[-1].content, self.limits.max_line_chars),
                                         ("messages[-1].name", name, self.limits.max_name_chars),
                                         ("system messages", world.get(WORLD_KEY, ""),
                                          self.limits.max_world_value_chars)):
            if len(value) > limit:
                raise HttpError(400, f"{field_name}: {len(value)} characters; the limit is {limit}", param="messages")
        with _as_http_error():
            top_k = oj.whole(body, "top_k", None, -1, 1_000_000, " (no limit)")
            return TalkInput(model.name, "", chat[-1].content, world, name,
                             max_tokens=oj.whole(body, oj.max_tokens_field(body, True), 0, 1, self.limits.max_tokens),
                             temperature=oj.number(body, "temperature", None), top_p=oj.number(body, "top_p", None),
                             top_k=top_k if top_k and top_k > 0 else None,
                             repetition_penalty=oj.number(body, "repetition_penalty", None),
                             seed=oj.whole(body, "seed", None, 0, 2**63 - 1),
                             stop=check_stops("stop", oj.stop_list(body), self.limits), history=tuple(history))

    async def _respond(self, request: web.Request, body: dict, shape: oj.Shape, parts: AsyncIterator[_Part],
                       bound: Any) -> web.StreamResponse:
        """The reply as one JSON object, or streamed as server-sent events."""
        stream_options = body.get("stream_options") or {}
        usage_chunk = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        end: _Part | None = None
        outcome = "cancelled"
        response: web.StreamResponse | None = None
        try:
            async with contextlib.aclosing(parts):
                if body.get("stream") is not True:
                    async for part in parts:
                        end = part if part.end else end
                    if end is None:
                        raise HttpError(500, "the reply was cancelled", "server_error")
                    outcome = "done"
                    return web.json_response(shape.whole(end.text, end.reason, end.token_ids, end.usage, **end.extra))
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
                await response.prepare(request)
                try:
                    async for part in parts:
                        if not part.end:
                            await oj.send(response, shape.chunk(part.text, None, part.token_ids))
                            continue
                        end = part
                        await oj.send(response, shape.chunk("", oj.FINISH.get(part.reason or "stop", "stop"), (),
                                                            **part.extra))
                        if usage_chunk:
                            await oj.send(response, shape.usage_chunk(part.usage))
                    outcome = "done"
                except (QueueFull, BackendUnavailable, ReplyFailed) as e:  # the status line is sent: an error chunk
                    outcome = "failed"
                    await oj.send(response, {"error": (_failure(e) if isinstance(e, ReplyFailed)
                                                       else oj.refusal(e)).body()})
                await response.write(b"data: [DONE]\n\n")
                return response
        except ConnectionError:  # the client hung up while we wrote (the handler may not be cancelled yet)
            if response is None:
                raise
            return response
        except (QueueFull, BackendUnavailable, ReplyFailed, HttpError):
            outcome = "failed"
            raise
        finally:
            if outcome == "cancelled":  # the client hung up (the handler is cancelled)
                bound.info("http reply cancelled by the client")
            elif end is not None:
                bound.info("http reply", reason=end.reason, prompt_tokens=end.usage.get("prompt_tokens"),
                           completion_tokens=end.usage.get("completion_tokens"))

    async def _echo(self, body: dict, model: _Model, ids: list[int]) -> web.Response:
        """The prompt's token log-probabilities, without generating (vLLM: echo with max_tokens 0)."""
        if body.get("max_tokens") != 0 or body.get("stream") is True:
            raise HttpError(400, "echo: only with max_tokens 0 and without stream (prompt scoring)", param="echo")
        tail = min(len(ids) - 1, ECHO_LOGPROB_TOKENS)
        values: list[float | None] = [None] * (len(ids) - tail)
        if tail > 0:
            # The tail is one candidate continuation of the rest: its tokens' own log-probabilities.
            scored: EngineEvent | None = None
            async for event in self._submit(ids[:-tail], model.adapter, SamplingParams(max_tokens=1),
                                            choices=[ids[-tail:]]).events():
                if event.kind == "error":
                    raise ReplyFailed(event.error or "the request failed", event.internal)
                scored = event if event.kind == "finished" else scored
            if scored is None or not scored.choice_token_logprobs:
                raise HttpError(500, "prompt scoring was cancelled", "server_error")
            values += list(scored.choice_token_logprobs[0])
        tok = self.dialogue.engine.model.tokenizer
        logprobs = {"tokens": [tok.decode([t]) for t in ids], "token_logprobs": values,
                    "top_logprobs": [None] * len(ids), "text_offset": None}
        return web.json_response({
            "id": f"cmpl-echo-{time.monotonic_ns()}", "object": "text_completion", "created": int(time.time()),
            "model": model.name, "choices": [{"index": 0, "text": tok.decode(ids), "logprobs": logprobs,
                                              "finish_reason": "length", "prompt_token_ids": ids}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}})


async def _engine_parts(reply: Request) -> AsyncIterator[_Part]:
    """An engine request's events as reply parts; an error event raises ReplyFailed."""
    async for event in reply.events():
        if event.kind == "delta":
            yield _Part(event.text, event.token_ids)
        elif event.kind == "error":
            raise ReplyFailed(event.error or "the request failed", event.internal)
        elif event.kind == "finished":
            yield _Part(event.text, event.token_ids, True, event.finish_reason,
                        oj.usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens))


async def _turn_parts(turn: AsyncIterator[Any]) -> AsyncIterator[_Part]:
    """A turn's events (after TurnStarted) as reply parts."""
    async for event in turn:
        if isinstance(event, TurnDelta):
            yield _Part(event.text)
        elif isinstance(event, TurnFinished):
            yield _Part(event.text, event.token_ids, True, event.reason,
                        oj.usage(event.prompt_tokens, event.completion_tokens, event.cached_prompt_tokens),
                        {"emotion": event.emotion} if event.emotion else {})


def _failure(e: ReplyFailed) -> HttpError:
    if e.internal:
        return HttpError(500, str(e), "server_error")
    return HttpError(400, str(e), code="adapter_error", param="model")


@contextlib.contextmanager
def _as_http_error():
    """The checks shared with gRPC raise InvalidArgument (or SamplingParams' UserError): 400 here."""
    try:
        yield
    except InvalidArgument as e:
        raise HttpError(400, str(e), param=e.param) from None
    except UserError as e:
        raise HttpError(400, str(e)) from None
