"""A scene: characters talking among themselves, one line after another, while the player is elsewhere.

`Scenes.play()` is the whole scene for gRPC StartScene: the speakers take turns in the order given
(round robin) until the line budget is spent. Each line is one reply on the engine like a player's
turn (Dialogue.stream_reply: the speaker's own adapter, persona, knowledge and lore scope, emotion
and actions under its grammar); its prompt holds the scene's situation and what was said so far
(prompt.build_scene_messages). A scene sends one line at a time, so many scenes and player turns
share the engine's batch and a player's reply never queues behind more than one line of each scene.

With a session, every finished line is stored as a Turn with the scene's id (and no player line),
and the scene's situation and cast as a SceneRecord: what was said comes back to each participant
as a memory when the player later refers to it (FactRetriever.recall).

The player can step in: a Talk in the scene's session to one of its characters (`Scenes.step_in`)
waits for the line being said, then that character answers the player with the scene in its prompt;
the exchange becomes part of the scene (the others hear it), and the scene goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from sidecar.dialogue.characters import Character
from sidecar.dialogue.prompt import Prompt, fit_scene_to_budget
from sidecar.dialogue.reply_format import ReplyFormat
from sidecar.dialogue.sessions import SceneRecord, Turn
from sidecar.dialogue.turn import Dialogue, Reply, ShuttingDown, TalkInput, TurnEvent, TurnFinished, log
from sidecar.engine.api import QueueFull, SamplingParams, Timings
from sidecar.errors import UserError

DEFAULT_LINES = 6
QUEUE_RETRY_S = 0.05  # a later line waits this long (doubling to 1 s) for room in a full queue


class BadScene(UserError):
    """A scene request the server cannot play: the message names the field (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class SceneInput:
    """A scene request, checked for sizes by the edge (server/requests.py); the generation fields are
    TalkInput's and apply to every line (each speaker's own defaults fill what is None / 0)."""

    character_ids: tuple[str, ...]
    situation: str
    session_id: str = ""
    world: dict[str, str] = field(default_factory=dict)
    max_lines: int = 0  # 0: DEFAULT_LINES
    entities: dict[str, tuple[str, ...]] = field(default_factory=dict)
    allowed_actions: tuple[str, ...] = ()  # none by default: actions are written for dealings with the player
    max_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    seed: int | None = None  # line i uses seed + i
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class SceneStarted:
    scene_id: str
    character_ids: tuple[str, ...]
    names: tuple[str, ...]


@dataclass(frozen=True)
class SceneLine:
    """One event of line `index`, said by `character_id`."""

    index: int
    character_id: str
    event: TurnEvent


@dataclass(frozen=True)
class SceneFinished:
    reason: str  # "stop": the budget is spent; "cancelled": the server stopped a line
    lines: int  # lines that finished


SceneEvent = SceneStarted | SceneLine | SceneFinished


def check_scene(dialogue: Dialogue, scene: SceneInput) -> dict[str, str]:
    """The cast's names by id, in speaking order; raises BadScene, UnknownCharacter or CharacterUnavailable."""
    limits, cast = dialogue.limits, scene.character_ids
    if not 2 <= len(cast) <= limits.max_scene_characters:
        raise BadScene(f"character_ids: a scene has 2 to {limits.max_scene_characters} characters, got {len(cast)}")
    for i, cid in enumerate(cast):
        if cid in cast[:i]:
            raise BadScene(f"character_ids[{i}]: {cid!r} is already in the scene")
    if not scene.situation.strip():
        raise BadScene("situation: required (not empty, not only whitespace)")
    if not 0 <= scene.max_lines <= limits.max_scene_lines:
        raise BadScene(f"max_lines: must be from 0 ({DEFAULT_LINES}) to {limits.max_scene_lines}, "
                       f"got {scene.max_lines}")
    characters = [dialogue.serving(cid)[0] for cid in cast]
    actions = {a.name for c in characters for a in c.actions}
    for i, name in enumerate(scene.allowed_actions):
        if name not in actions:
            raise BadScene(f"allowed_actions.names[{i}]: no character of the scene has an action {name!r}")
    return {c.id: c.name for c in characters}


@dataclass
class _Running:
    """A scene being played: what the player's Talk needs to step in."""

    scene: SceneInput
    record: SceneRecord
    names: dict[str, str]
    lines: list[Turn] = field(default_factory=list)  # finished lines (and exchanges with the player), in order
    # Held while a line or a player's exchange is being said: one speaks at a time, and a Talk waiting for
    # it goes before the scene's next line (asyncio.Lock wakes waiters in order).
    floor: asyncio.Lock = field(default_factory=asyncio.Lock)


class Scenes:
    """The scenes being played on one Dialogue (on the server's event loop)."""

    def __init__(self, dialogue: Dialogue):
        self.dialogue = dialogue
        self._running: dict[str, list[_Running]] = {}  # by session id

    def running(self, session_id: str, character_id: str) -> _Running | None:
        """The scene of this session the character is in now, if any (the first one started)."""
        for run in self._running.get(session_id, ()):
            if character_id in run.scene.character_ids:
                return run
        return None

    async def play(self, scene: SceneInput) -> AsyncIterator[SceneEvent]:
        """The scene's events: SceneStarted, then SceneLine events line after line, then SceneFinished. Raises
        what Dialogue.talk raises; closing it (contextlib.aclosing) cancels the line being said."""
        dialogue = self.dialogue
        if not dialogue.accepting:
            raise ShuttingDown("the sidecar is shutting down")
        names = check_scene(dialogue, scene)
        if dialogue.engine.queue_full():
            raise QueueFull("the queue is full; retry after a short backoff")
        record = SceneRecord("scene-" + uuid.uuid4().hex[:12], scene.situation, scene.character_ids)
        run = _Running(scene, record, names)
        if scene.session_id:
            self._running.setdefault(scene.session_id, []).append(run)
        try:
            yield SceneStarted(record.scene_id, scene.character_ids, tuple(names.values()))
            said = 0
            for index in range(scene.max_lines or DEFAULT_LINES):
                speaker = scene.character_ids[index % len(scene.character_ids)]
                finished = None
                async with run.floor, contextlib.aclosing(self._line(run, index, speaker)) as events:
                    async for event in events:
                        yield SceneLine(index, speaker, event)
                        if isinstance(event, TurnFinished):
                            finished = event
                if finished is None or finished.reason == "cancelled":
                    yield SceneFinished("cancelled", said)
                    return
                said += 1
            yield SceneFinished("stop", said)
        finally:
            if scene.session_id:
                self._running[scene.session_id].remove(run)
                if not self._running[scene.session_id]:
                    del self._running[scene.session_id]

    async def step_in(self, run: _Running, talk: TalkInput, arrival: float | None = None
                      ) -> AsyncIterator[TurnEvent]:
        """The player's Talk to a character of a running scene: after the line being said, the character
        answers with the scene in its prompt; the exchange joins the scene and the session."""
        timings = Timings(arrival)
        dialogue = self.dialogue
        if not dialogue.accepting:
            raise ShuttingDown("the sidecar is shutting down")
        if dialogue.engine.queue_full():  # refused now rather than after waiting for the floor
            raise QueueFull("the queue is full; retry after a short backoff")
        async with run.floor:
            character, adapter = dialogue.serving(talk.character_id)
            fmt, sampling = dialogue.reply_plan(character, talk, talk.entities, talk.allowed_actions)
            facts = dialogue.retriever.facts(character, talk.player_line,
                                             run.lines[-1].npc_line if run.lines else "")
            prompt, memories = self._prompt(run, character, sampling, fmt, facts, talk)
            reply = Reply(fmt.parser(), log.bind(character=character.id, version=character.version,
                                                 scene=run.record.scene_id, session=talk.session_id))
            async with contextlib.aclosing(dialogue.stream_reply(character, adapter, prompt, sampling, fmt, timings,
                                                                 reply, facts, memories)) as events:
                async for event in events:
                    yield event
            relationships = ()
            if reply.completed:
                turn = self._keep(run, character, reply, talk)
                relationships = dialogue.apply_effects(character, talk.session_id, turn.actions)
            yield reply.finished_event(timings, relationships)

    async def _line(self, run: _Running, index: int, speaker: str) -> AsyncIterator[TurnEvent]:
        """One line's events; a finished line is appended to run.lines (and to the session)."""
        dialogue, scene = self.dialogue, run.scene
        timings = Timings()
        character, adapter = dialogue.serving(speaker)  # a character edited mid-scene speaks its new version next
        allowed = tuple(a.name for a in character.actions if a.name in scene.allowed_actions)
        seed = None if scene.seed is None else (scene.seed + index) % 2**64
        fmt, sampling = dialogue.reply_plan(character, replace(scene, seed=seed), scene.entities, allowed)
        lines = run.lines
        heard = lines[-1].npc_line if lines else scene.situation
        facts = dialogue.retriever.facts(character, heard, lines[-2].npc_line if len(lines) > 1 else "")
        prompt, memories = self._prompt(run, character, sampling, fmt, facts)
        reply = Reply(fmt.parser(), log.bind(character=character.id, version=character.version,
                                             scene=run.record.scene_id, line=index, session=scene.session_id or None))
        wait = QUEUE_RETRY_S
        while True:  # a line after the first waits for room rather than ending the scene
            try:
                events = dialogue.stream_reply(character, adapter, prompt, sampling, fmt, timings, reply, facts,
                                               memories, background=True)
                first = await anext(events)
                break
            except QueueFull:
                if index == 0:
                    raise
                await asyncio.sleep(wait)
                wait = min(1.0, wait * 2)
        async with contextlib.aclosing(events):
            yield first
            async for event in events:
                yield event
        if reply.completed:
            self._keep(run, character, reply)
        yield reply.finished_event(timings)

    def _keep(self, run: _Running, character: Character, reply: Reply, talk: TalkInput | None = None) -> Turn:
        """A finished line (an answer to `talk`, if given) joins the scene, and the session (the scene's record
        with its first line)."""
        turn = Turn(character.id, talk.player_line if talk else "", reply.parser.text,
                    talk.player_name if talk else "", character.version, reply.parser.emotion,
                    tuple(reply.parser.actions), scene_id=run.record.scene_id)
        if run.scene.session_id:
            if not run.lines:
                self.dialogue.sessions.add_scene(run.scene.session_id, run.record)
            self.dialogue.sessions.append_turn(run.scene.session_id, turn)
        run.lines.append(turn)
        return turn

    def _prompt(self, run: _Running, character: Character, sampling: SamplingParams, fmt: ReplyFormat,
                facts: tuple[str, ...], talk: TalkInput | None = None) -> tuple[Prompt, tuple[str, ...]]:
        """The prompt of the character's next words in the scene (an answer to `talk`'s player line, if given),
        and the memories it carries."""
        dialogue, scene = self.dialogue, run.scene
        heard = talk.player_line if talk else run.lines[-1].npc_line if run.lines else scene.situation
        memories: tuple[str, ...] = ()
        if scene.session_id:  # what the speaker remembers of the player and of earlier scenes
            memories = dialogue.retriever.recall(character, dialogue.sessions.history(scene.session_id), heard,
                                                 dialogue.sessions.scenes(scene.session_id), dialogue.names(),
                                                 run.record.scene_id)
        budget = dialogue.engine.config.max_seq_len - sampling.max_tokens
        prompt = fit_scene_to_budget(dialogue.engine.model.tokenizer, character, run.names, scene.situation,
                                     run.lines, {**scene.world, **(talk.world if talk else {})},
                                     max_prompt_tokens=budget, fmt=fmt, facts=facts, memories=memories,
                                     player_line=talk.player_line if talk else "",
                                     player_name=talk.player_name if talk else "")
        return prompt, memories
