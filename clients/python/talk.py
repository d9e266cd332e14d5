"""Talk to an NPC from a Python tool: the reply streams as it is generated.

    .venv/bin/python clients/python/talk.py --address 127.0.0.1:50051 blacksmith "Got any swords?"
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from sidecar.client import NpcClient
from sidecar.pb.npc.v1 import dialogue_pb2 as pb


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("character")
    parser.add_argument("line")
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--session", default="", help="session id: the NPC remembers earlier lines")
    parser.add_argument("--max-tokens", type=int, default=0, help="0: the character's default")
    parser.add_argument("--token", help="the server's --auth-token")
    args = parser.parse_args()

    async with NpcClient(args.address, auth_token=args.token, timeout=60) as npc:
        try:
            async for event in npc.talk(args.character, args.line, session_id=args.session,
                                        options=pb.GenerationOptions(max_tokens=args.max_tokens)):
                kind = event.WhichOneof("event")
                if kind == "delta":
                    print(event.delta.text, end="", flush=True)
                elif kind == "finished":
                    f = event.finished
                    print()
                    print(f"[{pb.FinishReason.Name(f.reason)}, emotion {f.emotion or '-'}, first token "
                          f"{f.timings.first_token_ms:.0f} ms, {f.usage.completion_tokens} tokens]", file=sys.stderr)
        except grpc.aio.AioRpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
