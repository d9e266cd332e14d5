"""Scenes: characters talking among themselves (dialogue/scene.py, gRPC StartScene).

What the dialogue layer builds (turn order, what each speaker's prompt holds, what the session keeps and
what comes back as memory) is checked with a recording engine; the stream, cancellation, a Talk beside a
scene and the refusals over a real socket, with `npc serve` on the embedded model."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time

import grpc
import pytest

from sidecar.client import NpcClient
from sidecar.config import RequestLimits
from sidecar.dialogue.registry import CharacterRegistry, UnknownCharacter
from sidecar.dialogue.scene import BadScene, SceneFinished, SceneInput, SceneLine, Scenes, SceneStarted
from sidecar.dialogue.sessions import SessionStore
from sidecar.dialogue.turn import Dialogue, TalkInput, TurnFinished, TurnStarted
from sidecar.engine.api import QueueFull
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from tests.recording_engine import RecordingEngine
from tests.sidecar_process import REPO, SidecarProcess, copy_characters, write_character

CAST = ("blacksmith", "elara", "quartermaster")
SITUATION = "A storm keeps everyone in the Drowned Lantern; talk turns to the Greyvein mine."
LINES = ["[amused] Storm or no storm, my forge stays lit.",
         "[amused] Your forge smells of wet dogs, smith.",
         "[amused] The mine took three men, and nobody asks who lit the powder.",
         "[amused] Wolves took the fourth."]


def _dialogue(tmp_path, tokenizer, replies=()) -> tuple[Dialogue, RecordingEngine, list]:
    root = tmp_path / "characters"
    for cid in CAST:
        shutil.copytree(REPO / "characters" / cid, root / cid, ignore=shutil.ignore_patterns(
            "adapter", "training", "*.jsonl"))
        path = root / cid / "character.yaml"
        path.write_text("\n".join(x for x in path.read_text().splitlines() if not x.startswith("adapter:")))
    records: list = []
    sessions = SessionStore()
    sessions.on_change = records.append
    engine = RecordingEngine(tokenizer, reply="[amused] Hm.", replies=list(replies))
    return Dialogue(engine, CharacterRegistry(root), sessions, RequestLimits()), engine, records


def _play(dialogue: Dialogue, scene: SceneInput) -> list:
    async def run():
        return [event async for event in Scenes(dialogue).play(scene)]

    return asyncio.run(run())


def _talk(dialogue: Dialogue, cid: str, session: str, line: str) -> list:
    async def run():
        return [event async for event in dialogue.talk(TalkInput(cid, session, line, world={}, player_name=""))]

    return asyncio.run(run())


def test_speakers_take_turns_and_each_hears_the_others(tmp_path, tokenizer):
    dialogue, engine, records = _dialogue(tmp_path, tokenizer, LINES)
    events = _play(dialogue, SceneInput(("blacksmith", "elara"), SITUATION, "save1", max_lines=4))

    started, finished = events[0], events[-1]
    assert isinstance(started, SceneStarted) and started.names == ("Brynja Emberforge", "Elara Nightbloom")
    assert isinstance(finished, SceneFinished) and (finished.reason, finished.lines) == ("stop", 4)
    lines = [e for e in events if isinstance(e, SceneLine)]
    ends = [e for e in lines if isinstance(e.event, TurnFinished)]
    assert [(e.index, e.character_id) for e in ends] == [(0, "blacksmith"), (1, "elara"), (2, "blacksmith"),
                                                        (3, "elara")]
    assert [e.event.text for e in ends] == [x.removeprefix("[amused] ") for x in LINES]
    assert all(isinstance(lines[i].event, TurnStarted) for i in range(len(lines)) if i == 0 or
               isinstance(lines[i - 1].event, TurnFinished))

    prompts = [tokenizer.decode(p) for p in engine.prompts]
    # Every speaker is told the situation and who else is there; the first speaks first.
    assert "You are in a scene with Elara Nightbloom; the player is not part of it. " + SITUATION in prompts[0]
    assert "You are in a scene with Brynja Emberforge;" in prompts[1]
    assert "(The scene begins. You speak first.)" in prompts[0]
    # elara hears the smith's line as the smith's, under the smith's name (decode() drops the control tokens).
    assert "\nuser\nBrynja Emberforge: Storm or no storm, my forge stays lit.\nassistant\n" in prompts[1]
    # The smith's own earlier line is hers (an assistant message, with its label); elara's is heard.
    assert "\nassistant\n[amused] Storm or no storm, my forge stays lit.\n" in prompts[2]
    assert prompts[2].endswith("\nuser\nElara Nightbloom: Your forge smells of wet dogs, smith.\nassistant\n")

    # The session keeps the lines (no player line) and the scene; the journal rebuilds both.
    export = dialogue.sessions.export("save1")
    assert [(t["character_id"], t["player_line"], t["scene_id"]) for t in export["turns"]] == [
        (cid, "", started.scene_id) for cid in ("blacksmith", "elara", "blacksmith", "elara")]
    assert export["scenes"] == [{"scene_id": started.scene_id, "situation": SITUATION,
                                 "character_ids": ["blacksmith", "elara"]}]
    replayed = SessionStore()
    for record in records:
        replayed.apply(record)
    assert replayed.export("save1") == export
    # A scene line is not an exchange with the player: the smith's next turn has no history.
    assert _talk(dialogue, "blacksmith", "save1", "Hello.")[0].history_turns == 0


def test_what_was_said_comes_back_to_those_who_were_there(tmp_path, tokenizer):
    mine = "[cheerful] The mine took three men, and nobody asks who lit the powder."  # one of her labels
    dialogue, engine, _ = _dialogue(tmp_path, tokenizer, [*LINES[:2], mine])
    _play(dialogue, SceneInput(("blacksmith", "elara", "quartermaster"), SITUATION, "save1", max_lines=3))
    question = "Who lit the powder in the mine?"
    # elara was there when the quartermaster said it; the smith was too.
    memories = _talk(dialogue, "elara", "save1", question)[0].memories
    assert any('Lucky Marla Finch said "The mine took three men, and nobody asks who lit the powder."' in m
               for m in memories), memories
    smith = _talk(dialogue, "blacksmith", "save1", question)[0].memories
    assert any("nobody asks who lit the powder" in m for m in smith)
    assert _talk(dialogue, "elara", "save2", question)[0].memories == ()  # another session knows nothing of it


def test_a_character_not_in_the_scene_does_not_remember_it(tmp_path, tokenizer):
    dialogue, _, _ = _dialogue(tmp_path, tokenizer, LINES[:2])
    _play(dialogue, SceneInput(("blacksmith", "elara"), SITUATION, "save1", max_lines=2))
    assert _talk(dialogue, "quartermaster", "save1", "Does the forge smell of wet dogs?")[0].memories == ()
    assert _talk(dialogue, "elara", "save1", "Does the forge smell of wet dogs?")[0].memories != ()


def test_a_reset_or_a_one_character_export_keeps_scenes_consistent(tmp_path, tokenizer):
    dialogue, _, _ = _dialogue(tmp_path, tokenizer, LINES[:2])
    _play(dialogue, SceneInput(("blacksmith", "elara"), SITUATION, "save1", max_lines=2))
    assert len(dialogue.sessions.export("save1", "elara")["scenes"]) == 1
    assert dialogue.sessions.export("save1", "oracle")["scenes"] == []
    dialogue.sessions.reset("save1", "blacksmith")
    assert len(dialogue.sessions.export("save1")["scenes"]) == 1  # elara's line is still there
    dialogue.sessions.reset("save1", "elara")
    assert dialogue.sessions.export("save1")["scenes"] == []
    # An export round-trips through import, scenes included.
    _play(dialogue, SceneInput(("blacksmith", "elara"), SITUATION, "save2", max_lines=2))
    data = dialogue.sessions.export("save2")
    dialogue.sessions.import_(data, "copy")
    assert dialogue.sessions.export("copy") == {**data, "session_id": "copy"}


@pytest.mark.parametrize("scene, field", [
    (SceneInput(("blacksmith",), SITUATION), "character_ids: a scene has 2 to 6"),
    (SceneInput(("blacksmith", "elara", "blacksmith"), SITUATION), "character_ids[2]: 'blacksmith' is already"),
    (SceneInput(("blacksmith", "elara"), "   "), "situation: required"),
    (SceneInput(("blacksmith", "elara"), SITUATION, max_lines=25), "max_lines: must be from 0"),
    (SceneInput(("blacksmith", "elara"), SITUATION, allowed_actions=("fly",)), "allowed_actions.names[0]"),
])  # fmt: skip
def test_bad_scenes_name_the_field(tmp_path, tokenizer, scene, field):
    dialogue, engine, _ = _dialogue(tmp_path, tokenizer)
    with pytest.raises(BadScene, match=field.replace("[", r"\[").replace("]", r"\]")):
        _play(dialogue, scene)
    with pytest.raises(UnknownCharacter):
        _play(dialogue, SceneInput(("blacksmith", "nobody"), SITUATION))
    assert engine.prompts == [] and len(dialogue.sessions) == 0  # nothing ran, nothing was kept


def test_allowed_actions_go_to_the_speakers_that_have_them(tmp_path, tokenizer):
    sale = '[amused] Take it.\n@sell_item {"item": "helm"}'
    dialogue, engine, _ = _dialogue(tmp_path, tokenizer, [sale, "[amused] Fine."])
    events = _play(dialogue, SceneInput(("blacksmith", "elara"), SITUATION, max_lines=2,
                                        entities={"stock": ("helm",)}, allowed_actions=("sell_item",)))
    ends = [e.event for e in events if isinstance(e, SceneLine) and isinstance(e.event, TurnFinished)]
    assert [a.name for a in ends[0].actions] == ["sell_item"] and ends[0].relationships == ()
    prompts = [tokenizer.decode(p) for p in engine.prompts]
    assert "You cannot do now: repair_item, buy_item." in prompts[0]
    assert "You cannot do now: guide_to, trade, draw_bow." in prompts[1]  # elara has no sell_item


# --- over a real socket ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    root = copy_characters(tmp_path_factory.mktemp("characters"), ("blacksmith", "elara", "oracle"))
    write_character(root, "broken", "x", generation="{temperature: hot}")  # never loads
    server = SidecarProcess(root, "--max-batch", "8")
    yield server
    assert server.stop() == 0, "".join(server.log[-20:])


GREEDY = pb.GenerationOptions(max_tokens=10, temperature=0.0)


def test_a_scene_streams_line_by_line_over_grpc(sidecar):
    async def go():
        async with NpcClient(sidecar.address) as client:
            events = [e async for e in client.scene(("blacksmith", "elara"), SITUATION, session_id="g1",
                                                   max_lines=3, options=GREEDY)]
            return events, await client.export_session("g1")

    events, state = asyncio.run(go())
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and set(kinds[1:-1]) == {"line"}
    assert list(events[0].started.names) == ["Brynja Emberforge", "Elara Nightbloom"]
    assert events[-1].finished.reason == pb.FINISH_REASON_STOP and events[-1].finished.lines == 3
    lines: dict[int, list] = {}
    for e in events[1:-1]:
        lines.setdefault(e.line.index, []).append(e.line)
    assert sorted(lines) == [0, 1, 2]
    for index, parts in lines.items():
        assert {p.character_id for p in parts} == {("blacksmith", "elara")[index % 2]}
        inner = [p.event.WhichOneof("event") for p in parts]
        assert inner[:2] == ["started", "emotion"] and inner[-1] == "finished"
        text = "".join(p.event.delta.text for p in parts if p.event.WhichOneof("event") == "delta")
        assert text.strip() and text == parts[-1].event.finished.full_text
    assert [(t.character_id, t.npc_line, t.scene_id) for t in state.turns] == [
        (lines[i][-1].character_id, lines[i][-1].event.finished.full_text, events[0].started.scene_id)
        for i in range(3)]
    assert [(s.scene_id, s.situation, list(s.character_ids)) for s in state.scenes] == [
        (events[0].started.scene_id, SITUATION, ["blacksmith", "elara"])]


def test_cancelling_a_scene_stops_it_and_a_talk_beside_it_finishes(sidecar):
    async def go():
        async with NpcClient(sidecar.address) as client:
            call = client.scene(("blacksmith", "oracle"), SITUATION, session_id="g2", max_lines=24,
                                options=pb.GenerationOptions(max_tokens=64, temperature=0.0))
            talk = asyncio.create_task(client.say("elara", "Which way to the ford?", options=GREEDY))
            async for event in call:
                if event.WhichOneof("event") == "line" and event.line.index == 1:
                    call.cancel()
                    break
            _, text, finished = await talk
            deadline = time.time() + 10
            while (info := await client.server_info()).active_sequences and time.time() < deadline:
                await asyncio.sleep(0.05)
            return text, finished, info, await client.export_session("g2")

    text, finished, info, state = asyncio.run(go())
    assert text.strip() and finished.reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert info.active_sequences == 0 and info.waiting_requests == 0  # the line being said was stopped
    # Line 0 finished and stays; the scene stopped at line 1 (which may have ended before the cancel arrived:
    # the dialogue-level test below checks that a line cut off is not kept).
    assert [t.character_id for t in state.turns] in (["blacksmith"], ["blacksmith", "oracle"])


def test_the_player_steps_in_over_grpc(sidecar):
    async def go():
        async with NpcClient(sidecar.address) as client:
            scene = client.scene(("blacksmith", "elara"), SITUATION, session_id="g3", max_lines=3, options=GREEDY)
            talk = None
            events = []
            async for event in scene:
                events.append(event)
                if talk is None and event.WhichOneof("event") == "line":  # line 0 is being said
                    talk = asyncio.create_task(client.say("elara", "Is the ford safe?", session_id="g3",
                                                          options=GREEDY))
            return await talk, events, await client.export_session("g3")

    (started, text, finished), events, state = asyncio.run(go())
    assert text.strip() and finished.full_text == text
    assert events[-1].finished.lines == 3
    turns = [(t.character_id, t.player_line, bool(t.scene_id)) for t in state.turns]
    assert ("elara", "Is the ford safe?", True) in turns and len(turns) == 4
    assert [t for t in turns if not t[1]] == [("blacksmith", "", True), ("elara", "", True), ("blacksmith", "", True)]


@pytest.mark.parametrize("cast, extra, code, message", [
    (("blacksmith",), {}, grpc.StatusCode.INVALID_ARGUMENT, "character_ids"),
    (("blacksmith", "blacksmith"), {}, grpc.StatusCode.INVALID_ARGUMENT, "character_ids[1]"),
    (("blacksmith", "elara", "oracle", "a", "b", "c", "d"), {}, grpc.StatusCode.INVALID_ARGUMENT, "character_ids"),
    (("blacksmith", "Elara!"), {}, grpc.StatusCode.INVALID_ARGUMENT, "character_ids[1]"),
    (("blacksmith", "nobody"), {}, grpc.StatusCode.NOT_FOUND, "nobody"),
    (("blacksmith", "broken"), {}, grpc.StatusCode.FAILED_PRECONDITION, "broken"),
    (("blacksmith", "elara"), {"situation": ""}, grpc.StatusCode.INVALID_ARGUMENT, "situation"),
    (("blacksmith", "elara"), {"situation": "x" * 2001}, grpc.StatusCode.INVALID_ARGUMENT, "situation"),
    (("blacksmith", "elara"), {"max_lines": 25}, grpc.StatusCode.INVALID_ARGUMENT, "max_lines"),
    (("blacksmith", "elara"), {"allowed_actions": ["fly"]}, grpc.StatusCode.INVALID_ARGUMENT, "allowed_actions"),
    (("blacksmith", "elara"), {"session_id": "s" * 257}, grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
])  # fmt: skip
def test_bad_scenes_over_grpc(sidecar, cast, extra, code, message):
    async def go():
        async with NpcClient(sidecar.address) as client:
            kwargs = {"situation": SITUATION, **extra}
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                async for _ in client.scene(cast, kwargs.pop("situation"), **kwargs):
                    pass
            # Nothing else is affected: a Talk right after is served.
            _, text, _ = await client.say("oracle", "Hello?", options=GREEDY)
            return excinfo.value, text

    error, text = asyncio.run(go())
    assert error.code() == code and message in error.details(), error.details()
    assert text.strip()


def test_a_closed_scene_stream_cancels_its_line(tmp_path, tokenizer):
    """Closing play_scene (what the edge does when its client goes away) closes the line's engine request."""
    dialogue, engine, _ = _dialogue(tmp_path, tokenizer, LINES)

    async def run():
        async with contextlib.aclosing(Scenes(dialogue).play(SceneInput(("blacksmith", "elara"), SITUATION,
                                                                       "s", max_lines=4))) as events:
            async for event in events:
                if isinstance(event, SceneLine) and event.index == 1:
                    break
        return dialogue.in_flight, dialogue.busy

    in_flight, busy = asyncio.run(run())
    assert in_flight == {} and not busy
    assert [t.character_id for t in dialogue.sessions.history("s")] == ["blacksmith"]


def test_the_player_steps_in_between_two_lines(tmp_path, tokenizer):
    answer = "[amused] The ford is safe at dawn, stranger."
    dialogue, engine, _ = _dialogue(tmp_path, tokenizer, [LINES[0], answer, LINES[1], LINES[2]])
    scenes = Scenes(dialogue)

    async def run():
        async with contextlib.aclosing(scenes.play(SceneInput(("blacksmith", "elara"), SITUATION, "s",
                                                              max_lines=3))) as scene:
            assert isinstance(await anext(scene), SceneStarted)
            assert isinstance((await anext(scene)).event, TurnStarted)  # line 0 is being said: it holds the floor
            running = scenes.running("s", "elara")
            assert running is not None and scenes.running("s", "oracle") is None
            assert scenes.running("other", "elara") is None
            talk = TalkInput("elara", "s", "Is the ford safe?", world={}, player_name="Aria")

            async def step_in():
                return [e async for e in scenes.step_in(running, talk)]

            engine.full = True  # a full queue refuses the player at once, not after the line being said
            with pytest.raises(QueueFull):
                await anext(scenes.step_in(running, talk))
            engine.full = False
            task = asyncio.create_task(step_in())
            await asyncio.sleep(0.01)
            assert len(engine.prompts) == 1  # the player waits for the line being said
            rest = [e async for e in scene]
        return await task, rest

    talk_events, rest = asyncio.run(run())
    assert isinstance(talk_events[-1], TurnFinished) and talk_events[-1].text == "The ford is safe at dawn, stranger."
    assert isinstance(rest[-1], SceneFinished) and rest[-1].lines == 3  # the exchange is not one of the budget
    prompts = [tokenizer.decode(p) for p in engine.prompts]
    # She answers the player with the scene in her prompt; the smith then hears both.
    assert prompts[1].endswith("\nuser\nBrynja Emberforge: Storm or no storm, my forge stays lit.\n"
                               "Aria: Is the ford safe?\nassistant\n")
    assert prompts[3].endswith("\nuser\nAria: Is the ford safe?\nElara Nightbloom: The ford is safe at dawn, stranger."
                               "\nElara Nightbloom: Your forge smells of wet dogs, smith.\nassistant\n")
    turns = dialogue.sessions.history("s")
    assert [(t.character_id, t.player_line) for t in turns] == [
        ("blacksmith", ""), ("elara", "Is the ford safe?"), ("elara", ""), ("blacksmith", "")]
    assert engine.background == [True, False, True, True]  # scene lines let the player's answer go first
    assert len({t.scene_id for t in turns}) == 1 and scenes.running("s", "elara") is None  # over: not running
