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
- POST /v1/chat/completions with `model` "base": `messages` go through the model's chat template,
  contents literal (role developer reads as system);
- POST /v1/chat/completions with a character: that character's turn, as gRPC Talk makes it
  (dialogue/turn.py): its persona, knowledge and adapter; the last message is the player's line
  (role user, its `name` the player's name), earlier user / assistant messages are the history
  (an assistant message's `emotion` and `tool_calls` are what that reply felt and did), system
  messages are the situation (a world fact); sampling fields left out take the character's
  defaults. No server session is read or written: the messages are the conversation.

Structured replies, all decoded under a grammar (constrained decoding: engine/grammar.py; a backend
without it answers 400):

- `response_format` {"type": "json_object"} / {"type": "json_schema", "json_schema": {"schema": ...}}
  or vLLM's `structured_outputs` {"json": SCHEMA} / {"grammar": LARK} (llguidance's dialect): the
  reply's text is that JSON / follows that grammar (completions and "base" chats);
- function calling with "base": `tools` ([{"type": "function", "function": {"name", "description",
  "parameters"}}], each parameters schema checked when the request comes) and `tool_choice`:
  "none" (the tools are not shown; plain reply), "auto" (the default with tools: text, or a call),
  "required" (the reply is one call of any listed tool) or {"type": "function", "function":
  {"name": ...}} (one call of that tool). The tools are listed in the system message (appended to
  the caller's first one) with how to call: the model writes a call as
  `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (ot.TOOL_CALL_OPEN; the Hermes /
  Qwen convention), the grammar allowing only the listed tools' names, each with arguments valid for
  its parameters schema; under "auto" free text may not begin with `<tool_call>`, and with a
  response_format the text alternative is that JSON. A call comes back as `message.tool_calls`
  ([{"id": "call_<request>_0", "type": "function", "function": {"name", "arguments": JSON text}}]),
  content null, finish_reason "tool_calls"; at most one call per reply (`parallel_tool_calls` is
  not honoured); a call cut by max_tokens comes back as its raw text, finish_reason "length".
  Streamed, text flows as it comes and a call is sent whole, in one delta.tool_calls chunk, when it
  is complete. The conversation continues as OpenAI clients send it: the assistant message with its
  tool_calls, then role "tool" messages (given to the model as user messages in
  <tool_response>...</tool_response>);
- a character's actions (character.yaml `actions`, dialogue/actions.py) are its tool calls: the
  turn's grammar lets it write up to three after its line, valid against its schema and the
  request's `entities` (an extra body field, {"stock": ["iron sword", ...]}, the game's lists the
  enum arguments take values from; checked by the turn, 400 naming the field). `tools` lists which
  of the character's actions it may take this turn, by function name only (their parameters are
  ignored: the character's schema sets the arguments; a name it does not have is 400 naming
  `tools[i].function.name`); without `tools`, every action; `tool_choice` "none" (no action) or
  "auto" (the default; "required" and a named tool are 400: the character decides whether it
  acts); response_format is 400 (the reply has its own format). The reply is the text as `content`
  with the actions as `tool_calls` (finish_reason "tool_calls" when there are any), and the
  character's `emotion` label as an extra field of the choice; streamed, the text's chunks, then
  one delta.tool_calls chunk per action (index counting from 0), then the last chunk with the
  emotion and finish_reason.

Sampling: max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, ignore_eos,
checked by server/requests.py as gRPC's options are; max_tokens defaults to 16 for a completion (as
OpenAI's) and to the server's limit for a chat reply (OpenAI bounds it by the context only).
Errors are OpenAI-shaped JSON, `{"error": {"message", "type", "param", "code"}}`: 400 bad input
(`param` names the field, e.g. "tools[1].function.parameters", and the message starts with it), 401
without the server's --auth-token as `Authorization: Bearer`, 404 unknown model or path, 429 queue
full, 503 draining.
A client that disconnects cancels its request in the engine (aiohttp cancels the handler).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from aiohttp import web

from sidecar.config import ServerConfig, parse_listen
from sidecar.dialogue.characters import Character, Generation
from sidecar.dialogue.registry import CharacterUnavailable, UnknownCharacter
from sidecar.dialogue.turn import (
    Dialogue,
    ReplyFailed,
    Request,
    ShuttingDown,
    TurnAction,
    TurnDelta,
    TurnFinished,
    reply_token_cap,
)
from sidecar.engine.api import AdapterRef, BackendUnavailable, EngineEvent, GrammarError, QueueFull, SamplingParams
from sidecar.errors import UserError
from sidecar.server import openai_json as oj
from sidecar.server import openai_tools as ot
from sidecar.server.openai_json import HttpError
from sidecar.server.openai_turn import talk_input
from sidecar.server.requests import check_stops

log = structlog.get_logger("sidecar.server")

BASE_MODEL = "base"
# Prompt log-probabilities (echo) are computed for at most this many final prompt tokens; earlier
# positions are null. Enough to score a short continuation (an emotion label), and cheap: the
# engine scores the tail as one candidate continuation instead of keeping logits for the whole
# prompt. Each value comes from one log-softmax (so it is never above 0).
ECHO_LOGPROB_TOKENS = 8
MAX_BODY_BYTES = 4 * 1024 * 1024


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
    # Calls (ot.tool_call): streamed as they come in parts that are not the end; the end holds them all
    # (a whole reply's message.tool_calls).
    tool_calls: tuple[dict, ...] = ()


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
        chat = [oj.message(m, i) for i, m in enumerate(messages)]
        if model.character is not None:
            return await self._turn(request, body, model, chat)
        if body.get("entities") is not None:
            raise HttpError(400, "entities: only for a character's turn (model = a character id)", param="entities")
        plan = ot.tool_plan(body)
        try:
            ids = self.dialogue.engine.model.tokenizer.encode_chat(ot.base_chat(chat, plan))
        except UserError as e:
            raise HttpError(400, str(e), param="messages") from None
        return await self._generate(request, body, model, ids, chat=True, plan=plan)

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

    def _sampling(self, body: dict, chat: bool, generation: Generation | None = None,
                  plan: ot.ToolPlan | None = None) -> SamplingParams:
        """The body's sampling parameters, checked as gRPC's options are (server/requests.py) under their
        OpenAI names, with OpenAI's defaults; max_tokens is clamped to the character's max_tokens_limit.
        The grammar: the tools' (`plan`), else response_format's / structured_outputs'."""
        oj.check_common(body)
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise HttpError(400, "ignore_eos: true or false", param="ignore_eos")
        with oj.as_http_error():
            return SamplingParams(
                # OpenAI's defaults: 16 for a completion; a chat reply is bounded only by the context.
                max_tokens=min(oj.whole(body, oj.max_tokens_field(body, chat), self.limits.max_tokens if chat else 16,
                                        1, self.limits.max_tokens), reply_token_cap(self.limits, generation)),
                temperature=oj.number(body, "temperature", 1.0), top_p=oj.number(body, "top_p", 1.0),
                top_k=max(oj.whole(body, "top_k", 0, -1, 1_000_000, " (no limit)"), 0),
                repetition_penalty=oj.number(body, "repetition_penalty", 1.0), min_p=oj.number(body, "min_p", 0.0),
                stop=check_stops("stop", oj.stop_list(body), self.limits),
                seed=oj.whole(body, "seed", None, 0, 2**63 - 1), ignore_eos=ignore_eos,
                grammar=plan.grammar if plan is not None else oj.grammar(body))

    async def _generate(self, request: web.Request, body: dict, model: _Model, ids: list[int],
                        chat: bool, plan: ot.ToolPlan | None = None) -> web.StreamResponse:
        """A completion of the caller's prompt, under the model's adapter; with `plan`, tool calls are
        parsed out of the reply."""
        sampling = self._sampling(body, chat, model.generation, plan)
        grammar_from = ("tools" if plan is not None else
                        "structured_outputs" if body.get("structured_outputs") is not None else "response_format")
        if sampling.grammar is not None and not self.dialogue.engine.constrained_decoding:
            raise HttpError(400, f"{grammar_from}: this backend ({self.dialogue.engine.name}) cannot constrain "
                                 "decoding to a grammar (the torch and remote backends can)", param=grammar_from)
        reply = self._submit(ids, model.adapter, sampling, grammar_from=grammar_from)
        bound = log.bind(request_id=reply.request_id, model=model.name, api="chat" if chat else "completions")
        shape = oj.Shape(reply.request_id, model.name, chat, body.get("return_token_ids") is True)
        parts = _engine_parts(reply)
        if plan is not None:
            parts = _tool_parts(parts, reply.request_id, plan.auto)
        try:
            return await self._respond(request, body, shape, parts, bound)
        finally:
            reply.close()  # also when the response failed before reading any event

    def _submit(self, ids: list[int], adapter: AdapterRef | None, sampling: SamplingParams,
                choices: list[list[int]] | None = None, grammar_from: str = "response_format") -> Request:
        try:
            return self.dialogue.submit(ids, adapter, sampling, choices=choices)
        except GrammarError as e:  # the grammar the body's `grammar_from` field asked for did not compile
            raise HttpError(400, str(e), param=grammar_from) from None
        except UserError as e:
            raise HttpError(400, str(e), param="prompt") from None

    async def _turn(self, request: web.Request, body: dict, model: _Model,
                    chat: list[oj.Message]) -> web.StreamResponse:
        """A character's turn (dialogue/turn.py) from the messages."""
        assert model.character is not None
        talk = talk_input(body, model.name, model.character, chat, self.limits)
        turn = self.dialogue.talk(talk, time.perf_counter())
        try:
            started = await anext(turn)  # refusals (queue full, prompt too long) come before the response
        except UserError as e:  # the turn checks the entities (names, values, limits) and fits the prompt
            message = str(e)
            raise HttpError(400, message, param="entities" if message.startswith("entities") else "messages") from None
        bound = log.bind(request_id=started.request_id, model=model.name, api="chat")
        shape = oj.Shape(started.request_id, model.name, True, with_ids=False)
        try:
            return await self._respond(request, body, shape, _turn_parts(turn, started.request_id), bound)
        finally:
            await turn.aclose()  # also when the response failed before reading on: cancels the reply

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
                    return web.json_response(shape.whole(end.text, end.reason, end.token_ids, end.usage,
                                                         end.tool_calls, **end.extra))
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
                await response.prepare(request)
                try:
                    async for part in parts:
                        if not part.end:
                            await oj.send(response, shape.chunk(part.text, None, part.token_ids, part.tool_calls))
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


async def _turn_parts(turn: AsyncIterator[Any], request_id: str) -> AsyncIterator[_Part]:
    """A turn's events (after TurnStarted) as reply parts: its actions are tool calls, after the text."""
    taken = 0
    async for event in turn:
        if isinstance(event, TurnDelta):
            yield _Part(event.text)
        elif isinstance(event, TurnAction):
            yield _Part(tool_calls=(ot.tool_call(request_id, taken, event.action.name, event.action.arguments_json),))
            taken += 1
        elif isinstance(event, TurnFinished):
            calls = tuple(ot.tool_call(request_id, i, a.name, a.arguments_json) for i, a in enumerate(event.actions))
            yield _Part(event.text, event.token_ids, True, "tool_calls" if calls else event.reason,
                        oj.usage(event.prompt_tokens, event.completion_tokens, event.cached_prompt_tokens),
                        {"emotion": event.emotion} if event.emotion else {}, calls)


async def _tool_parts(parts: AsyncIterator[_Part], request_id: str, auto: bool) -> AsyncIterator[_Part]:
    """A base-model reply under a ToolPlan's grammar: a reply that opens with ot.TOOL_CALL_OPEN is a call,
    held back and sent as one tool call at the end; other text ("auto") streams as content once it can no
    longer be the opening. A call cut short (max_tokens) comes back as content, finish_reason "length"."""
    held, held_ids = "", []
    deciding, calling = auto, not auto
    async with contextlib.aclosing(parts):
        async for part in parts:
            if part.end:
                call = ot.parse_call(part.text) if calling or deciding else None
                if call is None:
                    if held:
                        yield _Part(held, tuple(held_ids))
                    yield part
                    return
                calls = (ot.tool_call(request_id, 0, call[0], json.dumps(call[1], ensure_ascii=False)),)
                yield _Part(token_ids=tuple(held_ids), tool_calls=calls)
                yield replace(part, text="", reason="tool_calls", tool_calls=calls)
                return
            if calling or deciding:
                held, held_ids = held + part.text, [*held_ids, *part.token_ids]
                if deciding and held.startswith(ot.TOOL_CALL_OPEN):
                    deciding, calling = False, True
                elif deciding and not ot.TOOL_CALL_OPEN.startswith(held):  # text: from here on, as it comes
                    deciding = False
                    yield _Part(held, tuple(held_ids))
                    held, held_ids = "", []
                continue
            yield part


def _failure(e: ReplyFailed) -> HttpError:
    if e.internal:
        return HttpError(500, str(e), "server_error")
    return HttpError(400, str(e), code="adapter_error", param="model")
