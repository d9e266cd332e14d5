"""Talk to an NPC from a Python tool: the reply streams as it is generated.

    .venv/bin/python clients/python/talk.py --address 127.0.0.1:50051 blacksmith "Got any swords?"
    .venv/bin/python clients/python/talk.py blacksmith "I'll take the sword." \\
        --entity stock="iron sword" --entity stock=hammer --allow-action sell_item

stdout: the emotion in brackets (when the character declares emotions), the line as it streams, then one
line per action the NPC takes:

    [gruff] Forty gold, lad, and it's yours.
    -> sell_item(item="iron sword", price=40)

stderr: a summary (finish reason, emotion, actions, first token time, tokens). Exit status 1 on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from sidecar.client import NpcClient, format_action
from sidecar.pb.npc.v1 import dialogue_pb2 as pb


def entity(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"not LIST=VALUE: {text!r}")
    return name, value


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("character")
    parser.add_argument("line")
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--session", default="", help="session id: the NPC remembers earlier lines")
    parser.add_argument("--max-tokens", type=int, default=0, help="0: the character's default")
    parser.add_argument("--token", help="the server's --auth-token")
    parser.add_argument("--entity", type=entity, action="append", default=[], metavar="LIST=VALUE",
                        help="adds VALUE to the list LIST of the request's entities (repeat it)")
    parser.add_argument("--allow-action", action="append", metavar="NAME",
                        help="allow only this action (repeat it); default: every action of the character")
    parser.add_argument("--no-actions", action="store_true", help="allow no action at all")
    args = parser.parse_args()

    entities: dict[str, list[str]] = {}
    for name, value in args.entity:
        entities.setdefault(name, []).append(value)
    allowed = [] if args.no_actions else args.allow_action  # None: every action

    async with NpcClient(args.address, auth_token=args.token, timeout=60) as npc:
        line_open = False  # the line is printed, not its newline yet
        try:
            async for event in npc.talk(args.character, args.line, session_id=args.session,
                                        options=pb.GenerationOptions(max_tokens=args.max_tokens),
                                        entities=entities, allowed_actions=allowed):
                kind = event.WhichOneof("event")
                if kind == "emotion":
                    print(f"[{event.emotion.label}] ", end="", flush=True)
                    line_open = True
                elif kind == "delta":
                    print(event.delta.text, end="", flush=True)
                    line_open = True
                elif kind == "action":
                    if line_open:
                        print()
                        line_open = False
                    print("-> " + format_action(event.action), flush=True)
                elif kind == "finished":
                    f = event.finished
                    if line_open:
                        print()
                        line_open = False
                    print(f"[{pb.FinishReason.Name(f.reason)}, emotion {f.emotion or '-'}, actions {len(f.actions)}, "
                          f"first token {f.timings.first_token_ms:.0f} ms, {f.usage.completion_tokens} tokens]",
                          file=sys.stderr)
        except grpc.aio.AioRpcError as e:
            if line_open:
                print()
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
