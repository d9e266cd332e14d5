"""The async Python client of the sidecar (what `npc chat`, tools and tests use).

    async with NpcClient("127.0.0.1:50051") as npc:
        async for event in npc.talk("blacksmith", "Got any swords?", session_id="player1"):
            if event.HasField("delta"):
                print(event.delta.text, end="", flush=True)

Errors are grpc.aio.AioRpcError with the status code and message the server chose.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import grpc

from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from sidecar.pb.npc.v1 import dialogue_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


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
             timeout: float | None = None) -> grpc.aio.UnaryStreamCall:
        """One streamed reply: iterate it (`async for event in call`); `call.cancel()` stops it."""
        request = pb.TalkRequest(character_id=character_id, session_id=session_id, player_line=player_line,
                                 world=dict(world or {}), player_name=player_name, options=options)
        return self._stub.Talk(request, timeout=timeout or self.timeout, metadata=self._metadata)

    async def say(self, character_id: str, player_line: str, **kwargs) -> tuple[pb.Started, str, pb.Finished]:
        """A whole reply at once: (started, concatenated text, finished)."""
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

    async def server_info(self) -> pb.ServerInfo:
        return await self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self.timeout,
                                              metadata=self._metadata)

    async def stream_lines(self, character_id: str, player_line: str, **kwargs) -> AsyncIterator[str]:
        """Just the text pieces of a reply, for scripts."""
        async for event in self.talk(character_id, player_line, **kwargs):
            if event.WhichOneof("event") == "delta":
                yield event.delta.text
