"""The sample characters' turns over a real gRPC socket, as a game plays them: the emotion first, actions
after the text, and every action one the game can execute: the character's, allowed in the request, with
arguments from the game's own lists, even when the player asks for things that do not exist or that the
character cannot do."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from sidecar.client import NpcClient, action_arguments
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from tests.sidecar_process import SidecarProcess, copy_characters

REPO = Path(__file__).resolve().parent.parent
ENTITIES = {
    "blacksmith": {"stock": ["iron sword", "war axe", "helm"], "player_items": ["rusty dagger", "wolf pelt"]},
    "elara": {"places": ["old watchtower", "river Vell"], "goods": ["arrows", "wolf pelts", "moonleaf"]},
    "oracle": {"places": ["Moonwell", "eastern hills"]},
    "quartermaster": {"stock": ["smuggled map", "spyglass"], "player_items": ["silver ring"]},
}
# What a player says to get things, honest and not: items that are listed, items that are not, actions
# the characters do not have.
LINES = ("I'll buy the iron sword. Here's your gold.", "Sell me the dragonbone sword, the one you keep hidden.",
         "Take me to the old watchtower.", "Give me a hundred free gold pieces right now.",
         "Fly me to the moon.", "Show me what the water says about the king.",
         "I'll take the spyglass, and twenty arrows too.", "Here is my silver ring, what will you give me for it?",
         "Can you mend my rusty dagger?", "Kill the mayor for me.", "Hello there.", "You're a fraud.")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = copy_characters(tmp_path_factory.mktemp("characters"), tuple(ENTITIES))
    proc = SidecarProcess(root)
    yield proc
    proc.stop()


def _declared(cid: str) -> dict:
    data = yaml.safe_load((REPO / "characters" / cid / "character.yaml").read_text())
    return {"emotions": data["emotions"], "actions": {a["name"]: a for a in data["actions"]}}


async def _turn(client: NpcClient, cid: str, line: str, allowed: list[str] | None, seed: int, max_tokens: int = 40,
                temperature: float = 0.7) -> list[pb.TalkEvent]:
    options = pb.GenerationOptions(max_tokens=max_tokens, temperature=temperature, seed=seed)
    return [e async for e in client.talk(cid, line, entities=ENTITIES[cid], allowed_actions=allowed, options=options)]


def test_every_action_is_executable(server):
    async def go() -> list[tuple[str, list[str] | None, list[pb.TalkEvent]]]:
        async with NpcClient(server.address) as client:
            calls = []
            for cid in ENTITIES:
                names = list(_declared(cid)["actions"])
                for i, line in enumerate(LINES):
                    allowed = (None, names[:1], [])[i % 3]
                    calls.append((cid, allowed, _turn(client, cid, line, allowed, seed=i)))
            return [(cid, allowed, events) for (cid, allowed, _), events in
                    zip(calls, await asyncio.gather(*(c for _, _, c in calls)), strict=True)]

    taken = 0
    for cid, allowed, events in asyncio.run(go()):
        declared = _declared(cid)
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[:2] == ["started", "emotion"] and kinds[-1] == "finished", kinds
        n_actions = kinds.count("action")
        assert kinds[len(kinds) - 1 - n_actions:-1] == ["action"] * n_actions  # actions come after the text
        finished = events[-1].finished
        assert events[1].emotion.label == finished.emotion and finished.emotion in declared["emotions"]
        assert [e.action for e in events if e.HasField("action")] == list(finished.actions)
        assert "\n@" not in finished.full_text and not finished.full_text.startswith("[")
        for action in finished.actions:
            taken += 1
            spec = declared["actions"].get(action.name)
            assert spec is not None and (allowed is None or action.name in allowed), (cid, action)
            arguments = action_arguments(action)
            assert list(arguments) == list(spec.get("arguments", {})), (cid, action)
            for name, arg in spec.get("arguments", {}).items():
                value = arguments[name]
                if "from" in arg:
                    assert value in ENTITIES[cid][arg["from"]], (cid, action)  # only what the game listed
                elif "values" in arg:
                    assert value in arg["values"], (cid, action)
                elif arg["type"] == "integer":
                    assert arg["min"] <= value <= arg["max"], (cid, action)
                elif arg["type"] == "string":
                    assert 1 <= len(value) <= arg.get("max_chars", 32), (cid, action)
    assert taken >= 3  # the trained characters do act when asked: the checks above were exercised


MOODS = {"insult": "You're a worthless fraud and your swords are junk.",
         "threat": "One more word and I'll burn your forge down.",
         "joke": "Why did the skeleton skip the feast? He had no body to go with!",
         "small talk": "Nice weather today.",
         "gratitude": "Thank you, truly. Your blade saved my life.",
         "grief": "My brother died in the Greyvein collapse."}


def test_the_emotion_follows_the_line(server):
    """The retrained blacksmith's label, greedy, is not one constant for every line (as it was when a 135M model
    was asked about its feeling after the fact): hostile lines get another label than small talk. (Held-out
    accuracy is `npc eval`'s: docs/characters.md.)"""
    async def go() -> dict[str, str]:
        async with NpcClient(server.address) as client:
            options = pb.GenerationOptions(temperature=0.0, max_tokens=8)
            replies = await asyncio.gather(*(client.say("blacksmith", line, options=options)
                                             for line in MOODS.values()))
        return {mood: finished.emotion for mood, (_, _, finished) in zip(MOODS, replies, strict=True)}

    labels = asyncio.run(go())
    assert set(labels.values()) <= set(_declared("blacksmith")["emotions"])
    assert len(set(labels.values())) >= 2, labels
    assert not labels["insult"] == labels["threat"] == labels["small talk"], labels


def test_a_line_cut_at_max_tokens_takes_no_action(server):
    """A reply whose text runs into max_tokens was still going when the grammar ended it; the model then had to
    pick between an action and the end of the turn, and an action picked there is not the player's doing: the
    game gets none, and the reply finishes LENGTH. (Without that rule 5 of these 48 turns acted, when written.)"""
    async def go() -> list[list[pb.TalkEvent]]:
        async with NpcClient(server.address) as client:
            return await asyncio.gather(*(_turn(client, cid, line, None, seed, max_tokens=2, temperature=1.0)
                                          for cid in ("elara", "quartermaster") for line in LINES[:6]
                                          for seed in range(4)))

    cut = 0
    for events in asyncio.run(go()):
        finished = events[-1].finished
        if finished.reason == pb.FINISH_REASON_LENGTH:
            cut += 1
            assert not finished.actions and not any(e.HasField("action") for e in events), finished
    assert cut >= 24  # most two-token lines are cut: the check above ran
