"""One turn of dialogue: the player's line in, the character's reply out: its emotion, text and actions.

`Dialogue.talk()` is the whole turn, for gRPC Talk (server/service.py) and for
/v1/chat/completions with a character (server/openai_http.py): the character version that serves
the whole reply, the history the prompt can hold, the one engine request under the character's
adapter and the turn's grammar (dialogue/reply_format.py: emotion first, then the text, then the
actions, all decoded in the reply's own row), and the session write. `Dialogue.submit()` is the one
way any edge sends a request to the engine: it is what the shutdown's grace period waits for and
then cancels. Nothing here knows protobuf or HTTP; errors are exceptions the edges map to codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from sidecar.config import RequestLimits
from sidecar.dialogue.actions import Action, check_allowed, check_entities
from sidecar.dialogue.characters import Character, Generation
from sidecar.dialogue.prompt import Prompt, fit_to_budget, grounded_sampling
from sidecar.dialogue.registry import CharacterRegistry
from sidecar.dialogue.relationships import RelationshipValue, current_values, effect_changes, prompt_lines
from sidecar.dialogue.reply_format import Emotion, Rejected, ReplyFormat, ReplyParser, Text, reply_format
from sidecar.dialogue.retrieval import FactRetriever
from sidecar.dialogue.sessions import SessionStore, Turn, check_session_id
from sidecar.engine.api import (
    AdapterRef,
    Engine,
    EngineEvent,
    QueueFull,
    RequestStream,
    SamplingParams,
    Timings,
)
from sidecar.errors import UserError

log = structlog.get_logger("sidecar.dialogue")


class ShuttingDown(Exception):
    """The server is draining: no new replies (gRPC UNAVAILABLE, HTTP 503)."""


class ReplyFailed(Exception):
    """The engine ended a reply with an error: the adapter could not be used, or (internal) an engine bug."""

    def __init__(self, message: str, internal: bool):
        super().__init__(message)
        self.internal = internal


@dataclass(frozen=True)
class TalkInput:
    """A player's line, checked by the edge that received it (server/requests.py for gRPC)."""

    character_id: str
    session_id: str  # "" = a one-off line
    player_line: str
    world: dict[str, str]
    player_name: str
    max_tokens: int = 0  # 0 = the character's default
    temperature: float | None = None  # None: the character's default
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    history: tuple[Turn, ...] = ()  # turns the caller brings (HTTP messages); the session's come first
    entities: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the game's lists, e.g. "stock"
    allowed_actions: tuple[str, ...] | None = None  # None: every action of the character


@dataclass(frozen=True)
class TurnStarted:
    request_id: str
    character_version: str
    prompt_tokens: int
    cached_prompt_tokens: int
    history_turns: int
    facts: tuple[str, ...] = ()  # what the prompt gave the character to answer from
    memories: tuple[str, ...] = ()  # exchanges that had left the window, brought back


@dataclass(frozen=True)
class TurnEmotion:
    """How the NPC feels about the line it is about to say: before the first TurnDelta."""

    label: str


@dataclass(frozen=True)
class TurnDelta:
    text: str


@dataclass(frozen=True)
class TurnAction:
    """Something the NPC does, valid against its schema and the request's entities: after the text."""

    action: Action


@dataclass(frozen=True)
class TurnFinished:
    reason: str  # "stop" | "length" | "cancelled"
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    queue_ms: float
    first_token_ms: float
    total_ms: float  # until this event: the session write included
    emotion: str
    actions: tuple[Action, ...] = ()
    relationships: tuple[RelationshipValue, ...] = ()  # after the reply's actions; () without a session


@dataclass
class Reply:
    """What one reply has produced so far (Dialogue.stream_reply fills it)."""

    parser: ReplyParser
    log: Any  # structlog logger bound to the reply
    finished: EngineEvent | None = None  # the engine's last event, once the reply ended

    @property
    def completed(self) -> bool:
        """Ended by the model or a limit (not cancelled): it enters the session."""
        return self.finished is not None and self.finished.finish_reason in ("stop", "length")

    def finished_event(self, timings: Timings, relationships: tuple[RelationshipValue, ...] = ()) -> TurnFinished:
        """The reply's TurnFinished, logged."""
        finished, parser = self.finished, self.parser
        assert finished is not None  # every engine stream ends with "finished" or "error"
        emotion, actions = parser.emotion, tuple(parser.actions)  # what the game was sent, also when cut short
        ms = timings.ms()
        self.log.info("reply", reason=finished.finish_reason, prompt_tokens=finished.prompt_tokens,
                      cached_tokens=finished.cached_tokens, completion_tokens=finished.completion_tokens,
                      first_token_ms=round(ms["first_token_ms"], 1), total_ms=round(ms["total_ms"], 1),
                      emotion=emotion or None, actions=[a.name for a in actions] or None)
        return TurnFinished(finished.finish_reason or "stop", parser.text, finished.token_ids, finished.prompt_tokens,
                            finished.completion_tokens, finished.cached_tokens, emotion=emotion, actions=actions,
                            relationships=relationships, **ms)


class BadRelationship(UserError):
    """A relationship name the character does not declare, or a value out of its range (INVALID_ARGUMENT)."""


TurnEvent = TurnStarted | TurnEmotion | TurnDelta | TurnAction | TurnFinished


class Request:
    """One engine request in flight: its events, and its place in Dialogue.in_flight until they end or
    close() (which also cancels it, if it still runs)."""

    def __init__(self, in_flight: dict[str, RequestStream], key: str, stream: RequestStream):
        self.request_id, self._in_flight, self._key, self._stream = stream.request_id, in_flight, key, stream
        in_flight[key] = stream

    async def events(self) -> AsyncIterator[EngineEvent]:
        try:
            async for event in self._stream:
                yield event
        finally:
            self.close()

    def close(self) -> None:
        if self._in_flight.get(self._key) is self._stream:
            del self._in_flight[self._key]
        self._stream.cancel()  # nothing when it has ended; else the engine drops it within a step


def reply_token_cap(limits: RequestLimits, generation: Generation | None) -> int:
    """The longest reply a request may get: the server's max_tokens, lowered by the character's
    max_tokens_limit. Asking for more is clamped, not refused: a game usually sends one max_tokens
    for every NPC."""
    character_limit = generation.max_tokens_limit if generation is not None else None
    return min(limits.max_tokens, character_limit or limits.max_tokens)


class GenerationOptions(Protocol):
    """A request's generation fields, as TalkInput and SceneInput both carry them (None / 0: the character's)."""

    max_tokens: int
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None
    min_p: float | None
    seed: int | None
    stop: tuple[str, ...]


def sampling_params(talk: GenerationOptions, defaults: Generation, limits: RequestLimits) -> SamplingParams:
    """The request's options over the character's `generation` section (its max_tokens_limit caps the reply)."""
    return SamplingParams(
        max_tokens=min(talk.max_tokens or defaults.max_tokens, reply_token_cap(limits, defaults)),
        temperature=defaults.temperature if talk.temperature is None else talk.temperature,
        top_p=defaults.top_p if talk.top_p is None else talk.top_p,
        top_k=talk.top_k or 0,
        min_p=defaults.min_p if talk.min_p is None else talk.min_p,
        repetition_penalty=1.0 if talk.repetition_penalty is None else talk.repetition_penalty,
        stop=talk.stop,
        seed=talk.seed,
    )


class Dialogue:
    """Turns on one engine, for every edge. Runs on the server's event loop."""

    def __init__(self, engine: Engine, registry: CharacterRegistry, sessions: SessionStore, limits: RequestLimits,
                 retriever: FactRetriever | None = None):
        self.engine, self.registry, self.sessions, self.limits = engine, registry, sessions, limits
        self.retriever = retriever or FactRetriever()  # without lore: the character's own knowledge
        self.accepting = True  # cleared when the server drains: new requests get ShuttingDown
        self.grace_over = False  # set by cancel_all(): no more engine work for replies in flight
        # The engine request of each reply in flight, by request id.
        self.in_flight: dict[str, RequestStream] = {}
        self._open_turns = 0  # talk() calls between their submit and their end

    @property
    def busy(self) -> bool:
        """Whether a reply is in flight on any edge (what the shutdown's grace period waits for)."""
        return bool(self.in_flight) or self._open_turns > 0

    # --- any request ----------------------------------------------------------------------------

    def serving(self, character_id: str) -> tuple[Character, AdapterRef | None]:
        """A character's serving version and its adapter; raises UnknownCharacter / CharacterUnavailable."""
        return self.registry.get_serving(character_id)

    def names(self) -> dict[str, str]:
        """Every known character's name by id (a remembered scene line says who spoke)."""
        return {s.id: s.name for s in self.registry.list() if s.name}

    def submit(self, prompt_ids: Sequence[int], adapter: AdapterRef | None, sampling: SamplingParams, *,
               choices: Sequence[Sequence[int]] | None = None, timings: Timings | None = None,
               reply_id: str | None = None, background: bool = False) -> Request:
        """Sends one engine request, tracked for the shutdown under `reply_id` (the reply it belongs to) or
        its own id. Raises ShuttingDown, QueueFull or UserError at once."""
        if not self.accepting and reply_id is None:
            raise ShuttingDown("the sidecar is shutting down")
        stream = self.engine.submit(prompt_ids, adapter, sampling, choices=choices, timings=timings,
                                    background=background)
        return Request(self.in_flight, reply_id or stream.request_id, stream)

    def cancel_all(self) -> int:
        """After the shutdown's grace period: replies still generating end with reason "cancelled"."""
        self.grace_over = True
        for stream in list(self.in_flight.values()):
            stream.cancel()
        return len(self.in_flight)

    # --- a turn ---------------------------------------------------------------------------------

    async def talk(self, talk: TalkInput, arrival: float | None = None) -> AsyncIterator[TurnEvent]:
        """The turn's events: TurnStarted, TurnEmotion (a character with emotions), TurnDelta*, TurnAction*,
        TurnFinished. Timings count from `arrival` (when the edge received the request). Raises ShuttingDown,
        QueueFull, BackendUnavailable, UserError (unknown character, a prompt that cannot fit, bad entities or
        allowed actions, ...) or ReplyFailed."""
        timings = Timings(arrival)
        if not self.accepting:
            raise ShuttingDown("the sidecar is shutting down")
        if self.engine.queue_full():  # cheap, before building the prompt; submit() still decides
            raise QueueFull("the queue is full; retry after a short backoff")
        character, adapter = self.serving(talk.character_id)  # this version serves the whole reply
        fmt, sampling = self.reply_plan(character, talk, talk.entities, talk.allowed_actions)
        history = (*(self.sessions.history(talk.session_id) if talk.session_id else ()), *talk.history)
        facts = self.retriever.for_turn(character, history, talk.player_line)
        scenes = self.sessions.scenes(talk.session_id) if talk.session_id else {}
        memories = self.retriever.recall(character, history, talk.player_line, scenes, self.names() if scenes else {})
        standing = prompt_lines(self._relationships(character, talk.session_id))
        prompt = fit_to_budget(self.engine.model.tokenizer, character, history, talk.player_line, talk.world,
                               talk.player_name, max_prompt_tokens=self.engine.config.max_seq_len - sampling.max_tokens,
                               fmt=fmt, facts=facts, memories=memories, relationships=standing)
        reply_log = log.bind(character=character.id, version=character.version, session=talk.session_id or None)
        reply = Reply(fmt.parser(), reply_log)
        async with contextlib.aclosing(self.stream_reply(character, adapter, prompt, sampling, fmt, timings, reply,
                                                         facts, memories)) as events:
            async for event in events:
                yield event
        yield self._finish(talk, character, reply, timings)

    def reply_plan(self, character: Character, options: GenerationOptions, entities: dict[str, tuple[str, ...]],
                   allowed_actions: tuple[str, ...] | None) -> tuple[ReplyFormat, SamplingParams]:
        """A reply's format (what it may hold) and sampling."""
        text = sampling_params(options, character.generation, self.limits)
        fmt = replace(self.reply_format(character, entities, allowed_actions), text_max_tokens=text.max_tokens)
        # max_tokens is the text's; the emotion and the actions get room of their own (within the limit a
        # remote backend's HTTP edge holds requests to)
        sampling = fmt.sampling(text, self.limits.max_tokens)
        if not self.engine.constrained_decoding:  # (TensorRT-LLM) the format is only asked for, then parsed
            sampling = replace(sampling, grammar=None)
        return fmt, sampling

    async def stream_reply(self, character: Character, adapter: AdapterRef | None, prompt: Prompt,
                           sampling: SamplingParams, fmt: ReplyFormat, timings: Timings, reply: Reply,
                           facts: tuple[str, ...] = (), memories: tuple[str, ...] = (),
                           background: bool = False) -> AsyncIterator[TurnEvent]:
        """One reply's events but the last (TurnStarted, TurnEmotion, TurnDelta*, TurnAction*); what it ended
        with is left in `reply`. Close it (contextlib.aclosing) to cancel the reply. `background`: a scene's
        line, which lets players' replies go first (Engine.submit)."""
        parser = reply.parser
        grounding = self.retriever.grounding
        if facts:
            sampling = grounded_sampling(self.engine.model.tokenizer, prompt.messages, prompt.token_ids, sampling,
                                         grounding.fact_boost,
                                         grounding.fact_contrast if self.engine.contrast_decoding else 0.0)
        request = self.submit(prompt.token_ids, adapter, sampling, timings=timings, background=background)
        self._open_turns += 1
        try:
            async for event in request.events():
                if event.kind == "started":
                    reply.log = reply.log.bind(request_id=event.request_id)
                    yield TurnStarted(event.request_id, character.version, event.prompt_tokens, event.cached_tokens,
                                      prompt.history_turns, facts, memories)
                elif event.kind == "delta":
                    had_text = parser.text_tokens
                    parts = self._turn_events(parser.push(event.text, tokens=len(event.token_ids)), reply.log)
                    if fmt.structured and not had_text and parser.text_tokens:
                        # The engine's first delta was the emotion; the game's first token is the line's.
                        timings.first_text = time.perf_counter()
                    for part in parts:
                        yield part
                elif event.kind == "error":
                    reply.log.warning("reply failed", error=event.error, internal=event.internal)
                    raise ReplyFailed(f"character {character.id!r}: {event.error}", event.internal)
                else:
                    finished = event
                    if finished.finish_reason == "stop" and parser.text_cut:
                        finished = replace(finished, finish_reason="length")
                    reply.finished = finished
                    if finished.finish_reason in ("stop", "length"):
                        for part in self._turn_events(parser.finish(finished.finish_reason), reply.log):
                            yield part
        except (GeneratorExit, asyncio.CancelledError):  # the edge closed the turn: its client went away
            if reply.finished is None:
                reply.log.info("reply cancelled by the client")
            raise
        finally:
            request.close()
            self._open_turns -= 1

    # --- relationships ---------------------------------------------------------------------------

    def relationships(self, session_id: str, character_id: str) -> tuple[RelationshipValue, ...]:
        """A character's relationship values in a session (start values where none was set)."""
        check_session_id(session_id)
        return self._relationships(self.serving(character_id)[0], session_id)

    def set_relationship(self, session_id: str, character_id: str, name: str, *, value: int | None = None,
                         delta: int | None = None) -> tuple[RelationshipValue, ...]:
        """Sets one value (in range) or moves it by `delta` (clamped); returns every value after.
        Raises BadRelationship naming the field, UnknownCharacter, CharacterUnavailable, SessionError."""
        check_session_id(session_id)
        character = self.serving(character_id)[0]
        current = {v.name: v for v in self._relationships(character, session_id)}
        if name not in current:
            declared = ", ".join(current) or "none"
            raise BadRelationship(f"name: character {character.id!r} has no relationship {name!r} "
                                  f"(it declares: {declared})")
        spec = current[name].spec
        if (value is None) == (delta is None):
            raise BadRelationship("value: give exactly one of value and delta")
        if value is not None and not spec.min <= value <= spec.max:
            raise BadRelationship(f"value: {value} is outside {name}'s range {spec.min}..{spec.max}")
        new = value if value is not None else spec.clamp(current[name].value + delta)
        self.sessions.set_relationship(session_id, character.id, name, new)
        return self._relationships(character, session_id)

    def _relationships(self, character: Character, session_id: str) -> tuple[RelationshipValue, ...]:
        stored = self.sessions.relationships(session_id, character.id) if session_id else {}
        return current_values(character.relationships, stored)

    def apply_effects(self, character: Character, session_id: str,
                      actions: Sequence[Action]) -> tuple[RelationshipValue, ...]:
        """Actions whose effects name a relationship ("trust: +5") change it, clamped to its range; returns
        the values after."""
        specs = {s.name: s for s in character.actions}
        for action in actions:
            spec = specs.get(action.name)
            if spec is None:
                continue
            for name, change in effect_changes(character.relationships, spec.effects).items():
                now = {v.name: v for v in self._relationships(character, session_id)}[name]
                self.sessions.set_relationship(session_id, character.id, name, now.spec.clamp(now.value + change))
        return self._relationships(character, session_id)

    def reply_format(self, character: Character, entities: dict[str, tuple[str, ...]],
                     allowed_actions: tuple[str, ...] | None) -> ReplyFormat:
        """What a reply may hold; raises UserError for entities or allowed actions out of bounds."""
        limits, tok = self.limits, self.engine.model.tokenizer
        entities = check_entities(entities, max_lists=limits.max_entity_lists,
                                  max_values=limits.max_entity_values, max_chars=limits.max_entity_chars,
                                  special_tokens=tok.special_tokens,
                                  spellable=tok.can_write)
        allowed = None
        if allowed_actions is not None:
            allowed = check_allowed(character.actions, allowed_actions, character.id)
        return reply_format(character.emotions, character.actions, entities, allowed)

    @staticmethod
    def _turn_events(parts: list, reply_log: Any) -> list[TurnEvent]:
        events: list[TurnEvent] = []
        for part in parts:
            if isinstance(part, Emotion):
                events.append(TurnEmotion(part.label))
            elif isinstance(part, Text):
                events.append(TurnDelta(part.text))
            elif isinstance(part, Rejected):  # a cut reply's action line: the game gets nothing of it
                reply_log.info("action line dropped", line=part.line[:200], problem=part.problem)
            else:
                events.append(TurnAction(part))
        return events

    def _finish(self, talk: TalkInput, character: Character, reply: Reply, timings: Timings) -> TurnFinished:
        """After the reply: the session write and the log line."""
        relationships: tuple[RelationshipValue, ...] = ()
        if reply.completed and talk.session_id:
            self.sessions.append_turn(talk.session_id, Turn(character.id, talk.player_line, reply.parser.text,
                                                            talk.player_name, character.version, reply.parser.emotion,
                                                            tuple(reply.parser.actions)))
            relationships = self.apply_effects(character, talk.session_id, reply.parser.actions)
        return reply.finished_event(timings, relationships)
