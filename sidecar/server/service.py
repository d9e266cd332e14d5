"""The NpcDialogue servicer: protobuf <-> dialogue calls, and every status code. Nothing else: a turn
is dialogue/turn.py's, the model the engine's.

Everything here runs on the server's one asyncio loop; the model runs on the engine's thread.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

import grpc
import structlog

from sidecar.dialogue.actions import Action, ActionSpec, action_from_dict
from sidecar.dialogue.registry import CharacterStatus, CharacterUnavailable, LoadState, UnknownCharacter
from sidecar.dialogue.relationships import RelationshipValue
from sidecar.dialogue.scene import SceneEvent, SceneFinished, Scenes, SceneStarted
from sidecar.dialogue.sessions import SessionExists, UnknownSession
from sidecar.dialogue.turn import (
    Dialogue,
    ReplyFailed,
    ShuttingDown,
    TurnAction,
    TurnDelta,
    TurnEmotion,
    TurnEvent,
    TurnStarted,
)
from sidecar.engine.api import AdapterError, BackendUnavailable, QueueFull
from sidecar.errors import UserError
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from sidecar.pb.npc.v1 import dialogue_pb2_grpc as pb_grpc
from sidecar.server.requests import check_character_id, check_session_id, parse_scene, parse_talk

log = structlog.get_logger("sidecar.server")

VERSION = "0.1.0"

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
REFUSALS = tuple(kind for kind, _ in STATUS_FOR)
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "cancelled": pb.FINISH_REASON_CANCELLED}


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, ReplyFailed):  # the adapter failed to load, or (internal) an engine bug
        return grpc.StatusCode.INTERNAL if exc.internal else grpc.StatusCode.FAILED_PRECONDITION
    return next(code for kind, code in STATUS_FOR if isinstance(exc, kind))


class DialogueService(pb_grpc.NpcDialogueServicer):
    def __init__(self, dialogue: Dialogue):
        self.dialogue = dialogue
        self.scenes = Scenes(dialogue)
        self.engine, self.sessions, self.limits = dialogue.engine, dialogue.sessions, dialogue.limits

    async def Talk(self, request: pb.TalkRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TalkEvent]:
        received = time.perf_counter()  # Timings are measured from here, as the proto says
        try:
            talk = parse_talk(request, self.limits)
            # A character in a scene of this session answers the player there (the player steps in).
            scene = self.scenes.running(talk.session_id, talk.character_id) if talk.session_id else None
            turn_events = self.scenes.step_in(scene, talk, received) if scene else self.dialogue.talk(talk, received)
            # aclosing: a client that cancels or disconnects closes the turn at once, which cancels its reply.
            async with contextlib.aclosing(turn_events) as turn:
                async for event in turn:
                    yield talk_event(event)
        except (*REFUSALS, ReplyFailed) as exc:
            await self._refuse(context, "Talk", exc, character=request.character_id[:64])  # bounded log line

    async def StartScene(self, request: pb.SceneRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SceneEvent]:
        try:
            scene = parse_scene(request, self.limits)
            # aclosing: a client that cancels closes the scene at once, which cancels the line being said.
            async with contextlib.aclosing(self.scenes.play(scene)) as events:
                async for event in events:
                    yield scene_event(event)
        except (*REFUSALS, ReplyFailed) as exc:
            await self._refuse(context, "StartScene", exc, characters=",".join(request.character_ids[:8])[:200])

    # --- characters, sessions, server ---------------------------------------------------------

    async def ListCharacters(self, request: pb.ListCharactersRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListCharactersResponse:
        return pb.ListCharactersResponse(characters=[character_pb(s) for s in self.dialogue.registry.list()])

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
                               turns=[turn_pb(turn) for turn in data["turns"]],
                               relationships=[pb.RelationshipState(**r) for r in data["relationships"]],
                               scenes=[pb.SceneState(**s) for s in data["scenes"]])

    async def ImportSession(self, request: pb.ImportSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.ImportSessionResponse:
        try:
            if not request.HasField("state"):
                raise UserError("state: required")
            s = request.state
            data = {"format": s.format_version, "session_id": s.session_id, "updated_unix_ms": s.updated_unix_ms,
                    "turns": [{"character_id": t.character_id, "player_line": t.player_line, "npc_line": t.npc_line,
                               "player_name": t.player_name, "character_version": t.character_version,
                               "emotion": t.emotion, "actions": [action_dict(a) for a in t.actions],
                               "scene_id": t.scene_id}
                              for t in s.turns],
                    "relationships": [{"character_id": r.character_id, "name": r.name, "value": r.value}
                                      for r in s.relationships],
                    "scenes": [{"scene_id": c.scene_id, "situation": c.situation,
                                "character_ids": list(c.character_ids)} for c in s.scenes]}
            result = self.sessions.import_(data, overwrite=request.overwrite, where="state",
                                           format_field="format_version")
        except UserError as exc:
            await self._refuse(context, "ImportSession", exc)
        return pb.ImportSessionResponse(turns=result.turns, replaced=result.replaced)

    async def GetRelationships(self, request: pb.GetRelationshipsRequest,
                               context: grpc.aio.ServicerContext) -> pb.RelationshipsResponse:
        try:
            check_character_id(request.character_id)
            values = self.dialogue.relationships(request.session_id, request.character_id)
        except UserError as exc:
            await self._refuse(context, "GetRelationships", exc)
        return pb.RelationshipsResponse(relationships=[relationship_pb(v) for v in values])

    async def SetRelationship(self, request: pb.SetRelationshipRequest,
                              context: grpc.aio.ServicerContext) -> pb.RelationshipsResponse:
        try:
            check_character_id(request.character_id)
            values = self.dialogue.set_relationship(
                request.session_id, request.character_id, request.name,
                value=request.value if request.HasField("value") else None,
                delta=request.delta if request.HasField("delta") else None)
        except UserError as exc:
            await self._refuse(context, "SetRelationship", exc)
        return pb.RelationshipsResponse(relationships=[relationship_pb(v) for v in values])

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        engine = self.engine
        stats, cfg, model = engine.stats(), engine.config, engine.model
        return pb.ServerInfo(
            model=model.path.name, weights=model.weights, backend=engine.name, device=model.device,
            max_batch=cfg.max_batch, active_sequences=stats.active_sequences, waiting_requests=stats.waiting_requests,
            resident_adapters=len(stats.resident_adapters), version=VERSION,
            max_resident_adapters=cfg.max_resident_adapters, max_waiting=cfg.max_waiting,
            context_tokens=cfg.max_seq_len, max_tokens_limit=self.limits.max_tokens, sessions=len(self.sessions),
            max_sessions=self.sessions.max_sessions, max_session_turns=self.sessions.max_turns,
            limits=pb.RequestLimits(**asdict(self.limits)), prefix_cache_bytes=stats.prefix_cache_bytes,
            prefix_cache_capacity_bytes=stats.prefix_cache_capacity_bytes, batch_rows_in_use=stats.batch_rows_in_use,
            kv_cache_bytes=stats.kv_cache_bytes)

    async def _refuse(self, context: grpc.aio.ServicerContext, rpc: str, exc: BaseException, **fields) -> None:
        code = status_for(exc)
        log.info("refused", rpc=rpc, code=code.name, error=str(exc), **fields)
        await context.abort(code, str(exc))


def talk_event(event: TurnEvent) -> pb.TalkEvent:
    if isinstance(event, TurnStarted):
        return pb.TalkEvent(started=pb.Started(
            request_id=event.request_id, character_version=event.character_version, prompt_tokens=event.prompt_tokens,
            cached_prompt_tokens=event.cached_prompt_tokens, history_turns=event.history_turns,
            facts=event.facts, memories=event.memories))
    if isinstance(event, TurnDelta):
        return pb.TalkEvent(delta=pb.TextDelta(text=event.text))
    if isinstance(event, TurnEmotion):
        return pb.TalkEvent(emotion=pb.Emotion(label=event.label))
    if isinstance(event, TurnAction):
        return pb.TalkEvent(action=action_pb(event.action))
    return pb.TalkEvent(finished=pb.Finished(
        reason=FINISH_REASONS.get(event.reason, pb.FINISH_REASON_UNSPECIFIED), full_text=event.text,
        usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                       cached_prompt_tokens=event.cached_prompt_tokens),
        timings=pb.Timings(queue_ms=event.queue_ms, first_token_ms=event.first_token_ms, total_ms=event.total_ms),
        emotion=event.emotion, actions=[action_pb(a) for a in event.actions],
        relationships=[relationship_pb(r) for r in event.relationships]))


def scene_event(event: SceneEvent) -> pb.SceneEvent:
    if isinstance(event, SceneStarted):
        return pb.SceneEvent(started=pb.SceneStarted(scene_id=event.scene_id, character_ids=event.character_ids,
                                                     names=event.names))
    if isinstance(event, SceneFinished):
        return pb.SceneEvent(finished=pb.SceneFinished(reason=FINISH_REASONS[event.reason], lines=event.lines))
    return pb.SceneEvent(line=pb.SceneLine(index=event.index, character_id=event.character_id,
                                           event=talk_event(event.event)))


def relationship_pb(value: RelationshipValue) -> pb.Relationship:
    return pb.Relationship(name=value.name, value=value.value, min_value=value.spec.min, max_value=value.spec.max,
                           tier=value.tier.name, tier_text=value.tier.text)


def action_pb(action: Action) -> pb.Action:
    arguments = []
    for name, value in action.arguments:
        if isinstance(value, bool):
            arguments.append(pb.ActionArgument(name=name, bool_value=value))
        elif isinstance(value, int):
            arguments.append(pb.ActionArgument(name=name, int_value=value))
        else:
            arguments.append(pb.ActionArgument(name=name, string_value=value))
    return pb.Action(name=action.name, arguments=arguments, arguments_json=action.arguments_json)


def action_dict(action: pb.Action) -> dict:
    """An imported turn's action in the session export's shape (dialogue/sessions.py checks it)."""
    return {"name": action.name, "arguments": {a.name: getattr(a, a.WhichOneof("value") or "string_value")
                                               for a in action.arguments}}


def turn_pb(turn: dict) -> pb.Turn:
    actions = [action_pb(action_from_dict(a, "turn.actions")) for a in turn["actions"]]
    return pb.Turn(**{k: v for k, v in turn.items() if k != "actions"}, actions=actions)


def action_spec_pb(spec: ActionSpec) -> pb.ActionSpec:
    return pb.ActionSpec(name=spec.name, description=spec.description, effects=dict(spec.effects), arguments=[
        pb.ArgumentSpec(name=a.name, type=a.type, values=list(a.values), values_from=a.values_from, min_value=a.min,
                        max_value=a.max, max_chars=a.max_chars if a.type == "string" else 0) for a in spec.arguments])


def character_pb(s: CharacterStatus) -> pb.Character:
    return pb.Character(id=s.id, name=s.name, version=s.version,
                        status=pb.CHARACTER_STATUS_READY if s.status == LoadState.READY else pb.CHARACTER_STATUS_FAILED,
                        error=s.error, has_adapter=s.has_adapter, greeting=s.greeting, emotions=list(s.emotions),
                        serving=s.serving, actions=[action_spec_pb(a) for a in s.actions])
