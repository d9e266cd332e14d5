"""The NpcDialogue servicer: protobuf <-> dialogue and engine calls, and every status code.

Everything here runs on the server's one asyncio loop; the model runs on the engine's thread.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

import grpc
import structlog

from sidecar.backends import BackendUnavailable, backend_name
from sidecar.config import ServerConfig
from sidecar.dialogue.characters import Character
from sidecar.dialogue.prompt import emotion_messages, fit_to_budget
from sidecar.dialogue.registry import (
    CharacterRegistry,
    CharacterStatus,
    CharacterUnavailable,
    LoadState,
    UnknownCharacter,
)
from sidecar.dialogue.sessions import SessionExists, SessionStore, Turn, UnknownSession
from sidecar.engine.engine import AsyncEngine, QueueFull, RequestStream
from sidecar.engine.sampler import SamplingParams
from sidecar.engine.sequence import AdapterRef, EngineEvent
from sidecar.errors import UserError
from sidecar.model.lora import AdapterError, LoraAdapter
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from sidecar.pb.npc.v1 import dialogue_pb2_grpc as pb_grpc
from sidecar.server.requests import check_character_id, check_session_id, parse_talk, sampling_params

log = structlog.get_logger("sidecar.server")

VERSION = "0.1.0"


class ShuttingDown(Exception):
    """The server is draining: no new replies (UNAVAILABLE)."""


# Most specific first: UserError is the catch-all for bad input.
STATUS_FOR = (
    (UnknownCharacter, grpc.StatusCode.NOT_FOUND),
    (UnknownSession, grpc.StatusCode.NOT_FOUND),
    (CharacterUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterError, grpc.StatusCode.FAILED_PRECONDITION),
    (SessionExists, grpc.StatusCode.ALREADY_EXISTS),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (BackendUnavailable, grpc.StatusCode.UNAVAILABLE),
    (UserError, grpc.StatusCode.INVALID_ARGUMENT),
)
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "cancelled": pb.FINISH_REASON_CANCELLED}


def status_for(exc: BaseException) -> grpc.StatusCode:
    return next(code for kind, code in STATUS_FOR if isinstance(exc, kind))


class ServingAdapters:
    """Each character's last good adapter, held in memory once validated.

    The engine gets these weights rather than the folder's path, so an adapter file overwritten
    (or half-copied) after its version was checked can never change what that version says.
    """

    KEEP = 2  # versions per character: the one serving, and a newer one validated but not yet published

    def __init__(self, load: Callable[[Character], LoraAdapter]):
        self._load = load
        # character id -> {(adapter version, scale): adapter}, oldest first
        self._by_character: dict[str, dict[tuple[str | None, float], LoraAdapter]] = {}

    def validate(self, character: Character) -> None:
        """The registry's adapter validator: raises AdapterError, or keeps the adapter for serving.
        It runs before the registry publishes the new version, so the serving one is kept too."""
        adapter = self._load(character)
        versions = self._by_character.setdefault(character.id, {})
        versions[(character.adapter_version, character.lora_scale)] = adapter
        while len(versions) > self.KEEP:
            del versions[next(iter(versions))]

    def forget(self, character_id: str, status: CharacterStatus | None) -> None:
        if status is None:  # the character's folder is gone
            self._by_character.pop(character_id, None)

    def ref(self, character: Character) -> AdapterRef | None:
        """The engine's handle on a character's adapter: editing only the persona keeps the adapter loaded."""
        if character.adapter_path is None:
            return None
        adapter = self._by_character.get(character.id, {}).get((character.adapter_version, character.lora_scale))
        return AdapterRef(character.id, character.adapter_path, character.adapter_version or character.version,
                          character.lora_scale, loaded=adapter)


class DialogueService(pb_grpc.NpcDialogueServicer):
    def __init__(self, engine: AsyncEngine, registry: CharacterRegistry, sessions: SessionStore,
                 config: ServerConfig, adapters: ServingAdapters, device: str = "cpu"):
        """`engine`: AsyncEngine or a backend with its surface (sidecar/backends)."""
        self.engine, self.registry, self.sessions, self.config = engine, registry, sessions, config
        self.adapters = adapters
        self.limits = config.limits
        self.device = device
        self.backend = backend_name(engine, device)
        self.accepting = True
        self.grace_over = False  # set by cancel_all(): no more engine work for replies in flight
        # Replies in flight, by request id: the stream the reply waits on (its text, then its emotion scoring).
        self.replies: dict[str, RequestStream] = {}

    # --- Talk ---------------------------------------------------------------------------------

    async def Talk(self, request: pb.TalkRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TalkEvent]:
        received = time.perf_counter()  # Timings are measured from here, as the proto says
        try:
            if not self.accepting:
                raise ShuttingDown("the sidecar is shutting down")
            talk = parse_talk(request, self.limits)
            if self.engine.queue_full():  # cheap, before building the prompt; submit() still decides
                raise QueueFull("the queue is full; retry after a short backoff")
            character = self.registry.get(talk.character_id)  # this version serves the whole reply
            sampling = sampling_params(talk, character.generation, self.limits)
            history = self.sessions.history(talk.session_id) if talk.session_id else ()
            prompt = fit_to_budget(self.engine.base.tokenizer, character, history, talk.player_line, talk.world,
                                   talk.player_name,
                                   max_prompt_tokens=self.engine.config.max_seq_len - sampling.max_tokens)
            stream = self.engine.submit(prompt.token_ids, self.adapters.ref(character), sampling)
        except (UserError, QueueFull, ShuttingDown) as exc:
            await self._refuse(context, "Talk", exc, character=request.character_id[:64])  # bounded log line
            return

        bound = log.bind(request_id=stream.request_id, character=character.id, version=character.version,
                         session=talk.session_id or None)
        self.replies[stream.request_id] = stream
        finished: EngineEvent | None = None
        queue_ms = first_token_ms = 0.0
        refused: list[Exception] = []
        try:
            async for event in _until_refused(stream, refused):
                if event.kind == "started":
                    queue_ms = (time.perf_counter() - received) * 1000
                    yield pb.TalkEvent(started=pb.Started(
                        request_id=stream.request_id, character_version=character.version,
                        prompt_tokens=event.prompt_tokens, cached_prompt_tokens=event.cached_tokens,
                        history_turns=prompt.history_turns))
                elif event.kind == "delta":
                    first_token_ms = first_token_ms or (time.perf_counter() - received) * 1000
                    yield pb.TalkEvent(delta=pb.TextDelta(text=event.text))
                elif event.kind == "error":  # the adapter failed to load, or (internal) an engine bug
                    bound.warning("reply failed", error=event.error, internal=event.internal)
                    code = grpc.StatusCode.INTERNAL if event.internal else grpc.StatusCode.FAILED_PRECONDITION
                    await context.abort(code, f"character {character.id!r}: {event.error}")
                else:
                    finished = event
            if refused:  # a remote backend was busy (429) or failed: RESOURCE_EXHAUSTED / UNAVAILABLE
                await self._refuse(context, "Talk", refused[0], character=character.id)
            if finished is None:
                return
            completed = finished.finish_reason in ("stop", "length")
            scoring = time.perf_counter()
            emotion = (await self._emotion(character, prompt.messages, finished.text, stream.request_id)
                       if completed else "")
            emotion_ms = (time.perf_counter() - scoring) * 1000
            if completed and talk.session_id:
                self.sessions.append_turn(talk.session_id, Turn(character.id, talk.player_line, finished.text,
                                                                talk.player_name, character.version))
            total_ms = (time.perf_counter() - received) * 1000
            bound.info("reply", reason=finished.finish_reason, prompt_tokens=finished.prompt_tokens,
                       cached_tokens=finished.cached_tokens, completion_tokens=finished.completion_tokens,
                       first_token_ms=round(first_token_ms, 1), total_ms=round(total_ms, 1),
                       emotion_ms=round(emotion_ms, 1) if emotion else None,
                       emotion=emotion or None)
            yield pb.TalkEvent(finished=pb.Finished(
                reason=FINISH_REASONS.get(finished.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
                full_text=finished.text,
                usage=pb.Usage(prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens,
                               cached_prompt_tokens=finished.cached_tokens),
                timings=pb.Timings(queue_ms=queue_ms, first_token_ms=first_token_ms, total_ms=total_ms),
                emotion=emotion))
        finally:
            # A client that cancels or disconnects lands here (the handler is cancelled): leaving the
            # stream's iterator cancels the sequence, which the engine drops within one step.
            self.replies.pop(stream.request_id, None)
            if finished is None:
                stream.cancel()
                if not refused:
                    bound.info("reply cancelled by the client")

    async def _emotion(self, character: Character, messages, reply: str, reply_id: str) -> str:
        """One of the character's emotion labels for this reply, by constrained choice under its adapter.

        The scoring stream takes the reply's place in `replies`, so the shutdown's cancel_all() cuts it
        as it cuts text: a reply whose text ended within the grace period keeps its reason and gets the
        first label, as when scoring fails (Finished.emotion is always one of the character's labels).
        """
        labels = character.emotions
        if not labels:
            return ""
        if self.grace_over:
            return labels[0]
        tok = self.engine.base.tokenizer
        ids = tok.encode_chat(emotion_messages(messages, reply, labels))
        try:
            stream = self.engine.submit(ids, self.adapters.ref(character), SamplingParams(max_tokens=1),
                                        choices=[tok.encode_literal(label) for label in labels])
            self.replies[reply_id] = stream
            async for event in stream:
                if event.kind == "finished" and event.choice is not None:
                    return labels[event.choice]
                if event.kind in ("finished", "error"):
                    break
        except (UserError, QueueFull, BackendUnavailable) as exc:  # e.g. a reply so long the question no longer fits
            log.warning("emotion not scored; using the first label", character=character.id, error=str(exc))
        return labels[0]

    # --- characters, sessions, server ---------------------------------------------------------

    async def ListCharacters(self, request: pb.ListCharactersRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListCharactersResponse:
        return pb.ListCharactersResponse(characters=[character_pb(s) for s in self.registry.list()])

    async def ResetSession(self, request: pb.ResetSessionRequest,
                           context: grpc.aio.ServicerContext) -> pb.ResetSessionResponse:
        try:
            check_session_id(request.session_id)
            check_character_id(request.character_id, required=False)
            forgotten = self.sessions.reset(request.session_id, request.character_id or None, missing_ok=True)
        except UserError as exc:
            await self._refuse(context, "ResetSession", exc)
        return pb.ResetSessionResponse(forgotten_turns=forgotten)

    async def ExportSession(self, request: pb.ExportSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.SessionState:
        try:
            check_session_id(request.session_id)
            check_character_id(request.character_id, required=False)
            data = self.sessions.export(request.session_id, request.character_id or None)
        except UserError as exc:
            await self._refuse(context, "ExportSession", exc)
        return pb.SessionState(format_version=data["format"], session_id=data["session_id"],
                               updated_unix_ms=data["updated_unix_ms"],
                               turns=[pb.Turn(**turn) for turn in data["turns"]])

    async def ImportSession(self, request: pb.ImportSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.ImportSessionResponse:
        try:
            if not request.HasField("state"):
                raise UserError("state: required")
            s = request.state
            data = {"format": s.format_version, "session_id": s.session_id, "updated_unix_ms": s.updated_unix_ms,
                    "turns": [{"character_id": t.character_id, "player_line": t.player_line, "npc_line": t.npc_line,
                               "player_name": t.player_name, "character_version": t.character_version}
                              for t in s.turns]}
            result = self.sessions.import_(data, overwrite=request.overwrite, where="state",
                                           format_field="format_version")
        except UserError as exc:
            await self._refuse(context, "ImportSession", exc)
        return pb.ImportSessionResponse(turns=result.turns, replaced=result.replaced)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        stats, cfg = self.engine.stats(), self.engine.config
        return pb.ServerInfo(
            model=self.engine.base.path.name, weights=self.engine.base.weights, backend=self.backend,
            max_batch=cfg.max_batch, active_sequences=int(stats["active_sequences"]),
            waiting_requests=int(stats["waiting_requests"]), resident_adapters=len(stats["resident_adapters"]),
            version=VERSION, max_resident_adapters=cfg.max_resident_adapters, max_waiting=cfg.max_waiting,
            context_tokens=cfg.max_seq_len, max_tokens_limit=self.limits.max_tokens, sessions=len(self.sessions),
            max_sessions=self.sessions.max_sessions, device=self.device,
            max_session_turns=self.sessions.max_turns, limits=pb.RequestLimits(**asdict(self.limits)),
            prefix_cache_bytes=int(stats.get("prefix_cache_bytes", 0)),
            prefix_cache_capacity_bytes=int(stats.get("prefix_cache_capacity_bytes", 0)))

    # --- shutdown -----------------------------------------------------------------------------

    def cancel_all(self) -> int:
        """After the shutdown grace period: replies still generating end with FINISH_REASON_CANCELLED;
        those whose text had ended skip (the rest of) their emotion scoring."""
        self.grace_over = True
        for stream in list(self.replies.values()):
            stream.cancel()
        return len(self.replies)

    async def _refuse(self, context: grpc.aio.ServicerContext, rpc: str, exc: BaseException, **fields) -> None:
        code = status_for(exc)
        log.info("refused", rpc=rpc, code=code.name, error=str(exc), **fields)
        await context.abort(code, str(exc))


async def _until_refused(stream: AsyncIterator[EngineEvent], refused: list[Exception]) -> AsyncIterator[EngineEvent]:
    """The stream's events; a backend's QueueFull or BackendUnavailable raised while streaming ends
    them and is put in `refused` (the in-process engine raises neither once submitted)."""
    try:
        async for event in stream:
            yield event
    except (QueueFull, BackendUnavailable) as exc:
        refused.append(exc)


def character_pb(s: CharacterStatus) -> pb.Character:
    return pb.Character(id=s.id, name=s.name, version=s.version,
                        status=pb.CHARACTER_STATUS_READY if s.status == LoadState.READY else pb.CHARACTER_STATUS_FAILED,
                        error=s.error, has_adapter=s.has_adapter, greeting=s.greeting, emotions=list(s.emotions),
                        serving=s.serving)
