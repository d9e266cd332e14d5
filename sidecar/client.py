"""The async Python client of the sidecar (what `npc chat`, tools and tests use).

    async with NpcClient("127.0.0.1:50051") as npc:
        async for event in npc.talk("blacksmith", "Got any swords?", session_id="player1",
                                    entities={"stock": ["iron sword", "hammer"]}):
            kind = event.WhichOneof("event")
            if kind == "emotion":      # once, before the text, when the character declares emotions
                print(f"[{event.emotion.label}] ", end="")
            elif kind == "delta":
                print(event.delta.text, end="", flush=True)
            elif kind == "action":     # after the text: what the NPC does, e.g. sell_item(item=..., price=40)
                print("\n-> " + format_action(event.action), end="")

The events come in the order dialogue.proto gives: started, [emotion], delta..., [action...], finished;
Finished.emotion and Finished.actions repeat the emotion and action events. Errors are
grpc.aio.AioRpcError with the status code and message the server chose.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping

import grpc

from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from sidecar.pb.npc.v1 import dialogue_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


def talk_request(character_id: str, player_line: str, session_id: str = "", world: Mapping[str, str] | None = None,
                 player_name: str = "", options: pb.GenerationOptions | None = None,
                 entities: Mapping[str, Iterable[str]] | None = None,
                 allowed_actions: Iterable[str] | None = None) -> pb.TalkRequest:
    """The TalkRequest of `NpcClient.talk`. `entities`: list name -> values, e.g. {"stock": ["iron sword"]}
    (TalkRequest.entities). `allowed_actions`: None allows every action of the character, a list only those
    (an empty one: none)."""
    request = pb.TalkRequest(character_id=character_id, session_id=session_id, player_line=player_line,
                             world=dict(world or {}), player_name=player_name, options=options)
    for name, values in (entities or {}).items():
        request.entities[name].values.extend(values)  # creates the list, also an empty one
    if allowed_actions is not None:
        request.allowed_actions.SetInParent()  # set, even with no names: no action allowed
        request.allowed_actions.names.extend(allowed_actions)
    return request


def action_arguments(action: pb.Action) -> dict[str, str | int | bool]:
    """An action's arguments as a dict, in their declared order, each value typed (enum and string
    arguments are str, integers int, booleans bool); None for a value kind this client does not know."""
    return {a.name: getattr(a, a.WhichOneof("value")) if a.WhichOneof("value") else None for a in action.arguments}


def format_action(action: pb.Action) -> str:
    """One line for logs and debug text: `sell_item(item="iron sword", price=40)`."""
    shown = []
    for name, value in action_arguments(action).items():
        if isinstance(value, bool):
            shown.append(f"{name}={'true' if value else 'false'}")
        elif isinstance(value, str):
            shown.append(f"{name}={json.dumps(value, ensure_ascii=False)}")
        else:
            shown.append(f"{name}={'?' if value is None else value}")
    return f"{action.name}({', '.join(shown)})"


class NpcClient:
    def __init__(self, address: str = DEFAULT_ADDRESS, auth_token: str | None = None, timeout: float | None = None):
        """`timeout`: default deadline in seconds of every call (None: none)."""
        self.address, self.timeout = address, timeout
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.NpcDialogueStub(self._channel)

    async def __aenter__(self) -> NpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout: float = 5.0) -> None:
        """Waits until the channel connects; raises TimeoutError when nothing listens at the address."""
        import asyncio

        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no sidecar answers at {self.address} (is `npc serve` running?)") from None

    def talk(self, character_id: str, player_line: str, session_id: str = "", world: Mapping[str, str] | None = None,
             player_name: str = "", options: pb.GenerationOptions | None = None,
             timeout: float | None = None, entities: Mapping[str, Iterable[str]] | None = None,
             allowed_actions: Iterable[str] | None = None) -> grpc.aio.UnaryStreamCall:
        """One streamed reply: iterate it (`async for event in call`); `call.cancel()` stops it. The events:
        started, emotion (when the character declares emotions), delta..., action... (after the text),
        finished. `entities` and `allowed_actions`: see `talk_request`."""
        request = talk_request(character_id, player_line, session_id=session_id, world=world,
                               player_name=player_name, options=options, entities=entities,
                               allowed_actions=allowed_actions)
        return self._stub.Talk(request, timeout=timeout or self.timeout, metadata=self._metadata)

    async def say(self, character_id: str, player_line: str, **kwargs) -> tuple[pb.Started, str, pb.Finished]:
        """A whole reply at once: (started, concatenated text, finished); the emotion and the actions are
        finished.emotion and finished.actions. Takes talk()'s keyword arguments."""
        started, text, finished = None, [], None
        async for event in self.talk(character_id, player_line, **kwargs):
            kind = event.WhichOneof("event")
            if kind == "started":
                started = event.started
            elif kind == "delta":
                text.append(event.delta.text)
            elif kind == "finished":
                finished = event.finished
        return started, "".join(text), finished

    def scene(self, character_ids: Iterable[str], situation: str, session_id: str = "",
              world: Mapping[str, str] | None = None, max_lines: int = 0,
              options: pb.GenerationOptions | None = None, timeout: float | None = None,
              entities: Mapping[str, Iterable[str]] | None = None,
              allowed_actions: Iterable[str] = ()) -> grpc.aio.UnaryStreamCall:
        """Characters talking among themselves (StartScene): iterate it; `call.cancel()` ends the scene.
        Events: started (the scene's id), then line events (`event.line.index`, `.character_id`, and
        `.event`: a Talk event of that line), then finished. `max_lines` 0: the server's default (6)."""
        request = pb.SceneRequest(character_ids=list(character_ids), situation=situation, session_id=session_id,
                                  world=dict(world or {}), max_lines=max_lines, options=options)
        for name, values in (entities or {}).items():
            request.entities[name].values.extend(values)
        request.allowed_actions.names.extend(allowed_actions)
        return self._stub.StartScene(request, timeout=timeout or self.timeout, metadata=self._metadata)

    async def list_characters(self) -> list[pb.Character]:
        reply = await self._stub.ListCharacters(pb.ListCharactersRequest(), timeout=self.timeout,
                                                metadata=self._metadata)
        return list(reply.characters)

    async def reset_session(self, session_id: str, character_id: str = "") -> int:
        reply = await self._stub.ResetSession(pb.ResetSessionRequest(session_id=session_id, character_id=character_id),
                                              timeout=self.timeout, metadata=self._metadata)
        return reply.forgotten_turns

    async def export_session(self, session_id: str, character_id: str = "") -> pb.SessionState:
        return await self._stub.ExportSession(pb.ExportSessionRequest(session_id=session_id,
                                                                      character_id=character_id),
                                              timeout=self.timeout, metadata=self._metadata)

    async def import_session(self, state: pb.SessionState, overwrite: bool = True) -> pb.ImportSessionResponse:
        return await self._stub.ImportSession(pb.ImportSessionRequest(state=state, overwrite=overwrite),
                                              timeout=self.timeout, metadata=self._metadata)

    async def relationships(self, session_id: str, character_id: str) -> list[pb.Relationship]:
        """The character's relationship values with the player of this session (start values if none were set)."""
        reply = await self._stub.GetRelationships(
            pb.GetRelationshipsRequest(session_id=session_id, character_id=character_id), timeout=self.timeout,
            metadata=self._metadata)
        return list(reply.relationships)

    async def set_relationship(self, session_id: str, character_id: str, name: str, value: int | None = None,
                               delta: int | None = None) -> list[pb.Relationship]:
        """Sets one value (or moves it by `delta`); returns every value after."""
        request = pb.SetRelationshipRequest(session_id=session_id, character_id=character_id, name=name)
        if value is not None:
            request.value = value
        if delta is not None:
            request.delta = delta
        reply = await self._stub.SetRelationship(request, timeout=self.timeout, metadata=self._metadata)
        return list(reply.relationships)

    async def server_info(self) -> pb.ServerInfo:
        return await self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout,
                                              metadata=self._metadata)

    async def stream_lines(self, character_id: str, player_line: str, **kwargs) -> AsyncIterator[str]:
        """Just the text pieces of a reply, for scripts."""
        async for event in self.talk(character_id, player_line, **kwargs):
            if event.WhichOneof("event") == "delta":
                yield event.delta.text
