"""`npc chat`: talk to any character over gRPC, for playtesting. The reply streams as it is generated.

A reply shows as the game gets it: the emotion first (`[gruff] `), then the line, then each action
the NPC takes (`  -> sell_item(item="iron sword")`).

Commands: /characters, /switch ID, /reset, /world key=value (key= removes it; /world alone shows
them), /entity list=a,b,c (the game's entity lists: what the NPC's actions may name), /allow
NAME,... (/allow all; /allow none), /lore and /memory (what the last prompt gave the character to answer
from), /rel NAME=VALUE (/rel NAME+N, /rel NAME-N; /rel alone shows them), /scene ID ID "situation"
(characters talking among themselves, watched line by line), /seed N (/seed off), /stats,
/export FILE, /help, /quit. Line
editing and history come from prompt_toolkit when the terminal is interactive; piped input works too.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

import grpc
from google.protobuf import json_format

from sidecar.client import NpcClient, format_action
from sidecar.errors import UserError
from sidecar.pb.npc.v1 import dialogue_pb2 as pb

HELP = """commands:
  /characters        list the characters (* = the one you talk to)
  /switch ID         talk to another character
  /reset             forget this conversation with the current character
  /world key=value   a world fact for the next lines (key= removes it; /world shows them)
  /entity list=a,b   an entity list of the game, e.g. /entity stock=iron sword,helm (list= removes it)
  /allow a,b         only these actions (/allow all: every action; /allow none: no action)
  /lore              the facts the last prompt gave the character (its knowledge and lore in its scope)
  /memory            earlier exchanges the last prompt brought back (long-term memory)
  /rel trust=40      set a relationship (/rel trust+5, /rel trust-5; /rel shows them)
  /scene A B "what"  watch characters talk among themselves, e.g.
                     /scene blacksmith elara "A storm keeps them both in the tavern." (add a number: lines)
  /seed N            reproducible replies (/seed off: random again)
  /stats             timings and token counts of the last reply
  /export FILE       save this session as JSON (ImportSession takes it back)
  /quit              leave (Ctrl-D too)"""


class Chat:
    def __init__(self, client: NpcClient, character: str | None, out=sys.stdout):
        self.client, self.character, self.out = client, character, out
        self.session_id = f"chat-{os.getpid()}-{int(time.time())}"
        self.world: dict[str, str] = {}
        self.entities: dict[str, list[str]] = {}
        self.allowed: list[str] | None = None  # None: every action of the character
        self.seed: int | None = None
        self.last: pb.Finished | None = None
        self.last_started: pb.Started | None = None
        self.names: dict[str, str] = {}

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    async def start(self) -> None:
        characters = await self.client.list_characters()
        serving = [c for c in characters if c.serving]
        if not serving:
            raise UserError("the sidecar has no character that can talk (see `npc check`)")
        if self.character is None:
            self.character = serving[0].id
        elif self.character not in {c.id for c in characters}:
            raise UserError(f"unknown character {self.character!r}; known: {', '.join(c.id for c in characters)}")
        await self._introduce()

    async def _introduce(self) -> None:
        characters = await self.client.list_characters()
        self.names = {c.id: c.name or c.id for c in characters}
        found = {c.id: c for c in characters}.get(self.character)
        if found is None:
            return
        self.say(f"-- talking to {found.name} ({found.id}){'' if found.has_adapter else ', persona only'}; "
                 "/help for commands")
        if found.greeting:
            self.say(f"{found.name}: {found.greeting}")

    async def handle(self, line: str) -> bool:
        """One line of input; False when the user wants to leave."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            return await self.command(line)
        await self.talk(line)
        return True

    async def talk(self, line: str) -> None:
        self.last = None
        options = pb.GenerationOptions(seed=self.seed) if self.seed is not None else None
        self.say(f"{self.names.get(self.character, self.character)}: ", end="")
        call = self.client.talk(self.character, line, session_id=self.session_id, world=self.world, options=options,
                                entities=self.entities, allowed_actions=self.allowed)
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "started":
                    self.last_started = event.started
                elif kind == "emotion":
                    self.say(f"[{event.emotion.label}] ", end="")
                elif kind == "delta":
                    self.say(event.delta.text, end="")
                elif kind == "action":
                    self.say(f"\n  -> {format_action(event.action)}", end="")
                elif kind == "finished":
                    self.last = event.finished
            self.say()
        except asyncio.CancelledError:
            call.cancel()
            self.say(" [cancelled]")
            raise
        except grpc.aio.AioRpcError as e:
            self.say()
            self.say(f"!! {e.code().name}: {e.details()}")

    async def scene(self, arg: str) -> None:
        """/scene ID ID... "situation" [LINES]: the scene streams line by line, into this chat's session."""
        try:
            words = shlex.split(arg)
        except ValueError as e:
            self.say(f"!! /scene: {e}")
            return
        lines = int(words.pop()) if len(words) > 3 and words[-1].isdigit() else 0
        if len(words) < 3:
            self.say('!! usage: /scene ID ID [ID...] "situation" [LINES]')
            return
        cast, situation = words[:-1], words[-1]
        options = pb.GenerationOptions(seed=self.seed) if self.seed is not None else None
        call = self.client.scene(cast, situation, session_id=self.session_id, world=self.world, max_lines=lines,
                                 options=options)
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "started":
                    self.say(f"-- scene {event.started.scene_id}: {', '.join(event.started.names)}")
                elif kind == "finished":
                    self.say(f"-- the scene is over ({event.finished.lines} lines)")
                else:
                    self._scene_line(event.line)
        except asyncio.CancelledError:
            call.cancel()
            self.say(" [scene stopped]")
            raise
        except grpc.aio.AioRpcError as e:
            self.say(f"!! {e.code().name}: {e.details()}")

    def _scene_line(self, line: pb.SceneLine) -> None:
        kind = line.event.WhichOneof("event")
        if kind == "started":
            self.say(f"{self.names.get(line.character_id, line.character_id)}: ", end="")
        elif kind == "emotion":
            self.say(f"[{line.event.emotion.label}] ", end="")
        elif kind == "delta":
            self.say(line.event.delta.text, end="")
        elif kind == "action":
            self.say(f"\n  -> {format_action(line.event.action)}", end="")
        elif kind == "finished":
            self.say()

    async def command(self, line: str) -> bool:
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/help":
            self.say(HELP)
        elif cmd == "/characters":
            for c in await self.client.list_characters():
                mark = "*" if c.id == self.character else " "
                state = "ready" if c.status == pb.CHARACTER_STATUS_READY else f"FAILED: {c.error}"
                self.say(f"{mark} {c.id:<20} {c.name:<28} {'adapter' if c.has_adapter else 'persona':<8} {state}")
        elif cmd == "/switch":
            ids = {c.id for c in await self.client.list_characters()}
            if arg not in ids:
                self.say(f"!! unknown character {arg!r}; try /characters")
            else:
                self.character = arg
                await self._introduce()
        elif cmd == "/reset":
            n = await self.client.reset_session(self.session_id, self.character)
            self.say(f"-- {self.character} forgot {n} turn(s)")
        elif cmd == "/world":
            self._world(arg)
        elif cmd == "/entity":
            self._entity(arg)
        elif cmd == "/allow":
            self.allowed = None if arg == "all" else [] if arg == "none" else [a.strip() for a in arg.split(",")
                                                                              if a.strip()]
            self.say(f"-- actions allowed: {'all' if self.allowed is None else ', '.join(self.allowed) or 'none'}")
        elif cmd in ("/lore", "/memory"):
            started = self.last_started
            items = [] if started is None else list(started.facts if cmd == "/lore" else started.memories)
            what = "facts" if cmd == "/lore" else "memories"
            self.say("\n".join(f"  - {x}" for x in items) or f"-- the last prompt had no {what}")
        elif cmd == "/rel":
            await self._relationships(arg)
        elif cmd == "/scene":
            await self.scene(arg)
        elif cmd == "/seed":
            self._seed(arg)
        elif cmd == "/stats":
            self._stats()
        elif cmd == "/export":
            await self._export(arg)
        else:
            self.say(f"!! unknown command {cmd}; /help lists them")
        return True

    async def _relationships(self, arg: str) -> None:
        try:
            if not arg:
                values = await self.client.relationships(self.session_id, self.character)
            else:
                name, op, number = next(((arg[:i].strip(), c, arg[i + 1:].strip()) for i, c in enumerate(arg)
                                         if c in "=+-"), (arg, "", ""))
                if not op or not number.lstrip("-").isdigit():
                    self.say("!! usage: /rel NAME=VALUE, /rel NAME+N or /rel NAME-N")
                    return
                n = int(number)
                values = await self.client.set_relationship(
                    self.session_id, self.character, name, value=n if op == "=" else None,
                    delta=None if op == "=" else (n if op == "+" else -n))
        except grpc.aio.AioRpcError as e:
            self.say(f"!! {e.code().name}: {e.details()}")
            return
        self.say("\n".join(f"  {r.name} = {r.value} ({r.min_value}..{r.max_value}): {r.tier} - {r.tier_text}"
                           for r in values) or f"-- {self.character} has no relationships")

    def _world(self, arg: str) -> None:
        if not arg:
            self.say("\n".join(f"  {k} = {v}" for k, v in sorted(self.world.items())) or "-- no world facts")
            return
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            self.say("!! usage: /world key=value (key= removes it)")
        elif value.strip():
            self.world[key.strip()] = value.strip()
        else:
            self.world.pop(key.strip(), None)

    def _entity(self, arg: str) -> None:
        if not arg:
            self.say("\n".join(f"  {k} = {', '.join(v)}" for k, v in sorted(self.entities.items()))
                     or "-- no entity lists")
            return
        name, sep, values = arg.partition("=")
        if not sep or not name.strip():
            self.say("!! usage: /entity list=a,b,c (list= removes it)")
        elif values.strip():
            self.entities[name.strip()] = [v.strip() for v in values.split(",") if v.strip()]
        else:
            self.entities.pop(name.strip(), None)

    def _seed(self, arg: str) -> None:
        if arg == "off":
            self.seed = None
            self.say("-- seed off: replies are random again")
        elif arg.isdigit():
            self.seed = int(arg)
            self.say(f"-- seed {self.seed}")
        else:
            self.say("!! usage: /seed N (a whole number >= 0) or /seed off")

    def _stats(self) -> None:
        f = self.last
        if f is None:
            self.say("-- no reply yet")
            return
        t, u = f.timings, f.usage
        gen_s = max(t.total_ms - t.first_token_ms, 1e-3) / 1000
        rate = (u.completion_tokens - 1) / gen_s if u.completion_tokens > 1 else 0.0
        self.say(f"-- first token {t.first_token_ms:.0f} ms (queue {t.queue_ms:.0f} ms), total {t.total_ms:.0f} ms, "
                 f"{rate:.1f} tokens/s; prompt {u.prompt_tokens} tokens ({u.cached_prompt_tokens} cached), "
                 f"reply {u.completion_tokens} tokens, {pb.FinishReason.Name(f.reason)}"
                 + (f", emotion {f.emotion}" if f.emotion else "")
                 + (f", actions {', '.join(format_action(a) for a in f.actions)}" if f.actions else ""))

    async def _export(self, arg: str) -> None:
        if not arg:
            self.say("!! usage: /export FILE")
            return
        try:
            state = await self.client.export_session(self.session_id)
        except grpc.aio.AioRpcError as e:
            self.say(f"!! {e.code().name}: {e.details()}")
            return
        Path(arg).write_text(json_format.MessageToJson(state))
        self.say(f"-- {len(state.turns)} turn(s) written to {arg}")


async def run_chat(address: str, character: str | None, auth_token: str | None = None) -> int:
    async with NpcClient(address, auth_token) as client:
        try:
            await client.wait_ready(timeout=3.0)
        except TimeoutError:
            raise UserError(f"no sidecar is running at {address}: start one with `npc serve` "
                            "(or `make serve`), or pass --address") from None
        chat = Chat(client, character)
        try:
            await chat.start()
        except grpc.aio.AioRpcError as e:
            raise UserError(f"{address}: {e.code().name}: {e.details()}") from None
        read = _line_reader()
        while True:
            try:
                line = await read(f"you ({chat.character})> ")
            except EOFError:
                return 0
            except KeyboardInterrupt:
                continue
            if not await chat.handle(line):
                return 0


def _line_reader():
    """prompt_toolkit (editing + history) on a terminal; plain lines from a pipe."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory

        history = Path(os.environ.get("NPC_CACHE_DIR") or Path.home() / ".cache" / "npc-sidecar") / "chat_history"
        history.parent.mkdir(parents=True, exist_ok=True)
        session = PromptSession(history=FileHistory(str(history)))
        return session.prompt_async

    async def read(prompt: str) -> str:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            raise EOFError
        return line

    return read
