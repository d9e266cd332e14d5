"""The Python client (sidecar.client.NpcClient and clients/python/talk.py): the emotion and action events
of a reply, and the request's entities and allowed_actions.

Against the fake sidecar of tests/client_fixtures.py (fixed events, no model) for what the client surfaces
and sends; against a real `npc serve` for the same with the model, on characters that declare emotions
(oracle) and actions (blacksmith with client_fixtures.SHOP_ACTIONS).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import grpc
import pytest
import yaml

from sidecar.client import NpcClient, action_arguments, format_action, talk_request
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from tests.client_fixtures import SHOP_ACTIONS, FakeSidecar, write_shop_character
from tests.sidecar_process import REPO, SidecarProcess, copy_characters

TALK_PY = REPO / "clients" / "python" / "talk.py"
ORDER = ["started", "emotion", "delta", "action", "finished"]


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def in_order(kinds_seen: list[str]) -> bool:
    """started, [emotion], delta..., action..., finished: the order dialogue.proto gives."""
    ranks = [ORDER.index(k) for k in kinds_seen]
    return (kinds_seen[:1] == ["started"] and kinds_seen[-1:] == ["finished"] and ranks == sorted(ranks)
            and kinds_seen.count("emotion") <= 1 and kinds_seen.count("started") == kinds_seen.count("finished") == 1)


async def collect(address: str, *args, **kwargs) -> list[pb.TalkEvent]:
    async with NpcClient(address, timeout=300) as npc:
        return [event async for event in npc.talk(*args, **kwargs)]


# --------------------------------------------------------------------------------------------
# Without a server


def test_talk_request_entities_and_allowed_actions():
    request = talk_request("blacksmith", "Hi", entities={"stock": ("iron sword", "hammer"), "empty": []})
    assert {k: list(v.values) for k, v in request.entities.items()} == {"stock": ["iron sword", "hammer"], "empty": []}
    assert not request.HasField("allowed_actions")  # None: every action of the character
    request = talk_request("blacksmith", "Hi", allowed_actions=[])
    assert request.HasField("allowed_actions") and list(request.allowed_actions.names) == []  # none at all
    request = talk_request("blacksmith", "Hi", allowed_actions=(n for n in ["sell_item", "open_gate"]))
    assert list(request.allowed_actions.names) == ["sell_item", "open_gate"]
    plain = talk_request("oracle", "Hi", session_id="s", world={"weather": "rain"}, player_name="Aria",
                         options=pb.GenerationOptions(max_tokens=8))
    assert plain == pb.TalkRequest(character_id="oracle", player_line="Hi", session_id="s", world={"weather": "rain"},
                                   player_name="Aria", options=pb.GenerationOptions(max_tokens=8))


def test_a_hand_built_event_stream_parses():
    """What a server sends, as bytes, read back: the new kinds of event and their typed arguments."""
    sell = pb.Action(name="sell_item", arguments_json='{"item": "iron sword", "price": 40}', arguments=[
        pb.ActionArgument(name="item", string_value="iron sword"), pb.ActionArgument(name="price", int_value=40)])
    wire = [pb.TalkEvent(emotion=pb.Emotion(label="gruff")).SerializeToString(),
            pb.TalkEvent(action=sell).SerializeToString()]
    emotion, action = (pb.TalkEvent.FromString(b) for b in wire)
    assert kinds([emotion, action]) == ["emotion", "action"]
    assert emotion.emotion.label == "gruff"
    assert action_arguments(action.action) == {"item": "iron sword", "price": 40}
    assert format_action(action.action) == 'sell_item(item="iron sword", price=40)'


def test_format_action():
    action = pb.Action(name="refuse", arguments=[
        pb.ActionArgument(name="note", string_value='say "please"\n'),
        pb.ActionArgument(name="urgent", bool_value=True), pb.ActionArgument(name="calm", bool_value=False),
        pb.ActionArgument(name="n", int_value=-3),
        pb.ActionArgument(name="unknown"),  # no value set: a value kind a newer server might add
    ])  # fmt: skip
    assert action_arguments(action) == {"note": 'say "please"\n', "urgent": True, "calm": False, "n": -3,
                                        "unknown": None}
    assert format_action(action) == 'refuse(note="say \\"please\\"\\n", urgent=true, calm=false, n=-3, unknown=?)'
    assert format_action(pb.Action(name="open_gate", arguments_json="{}")) == "open_gate()"
    assert format_action(pb.Action(name="greet", arguments=[pb.ActionArgument(name="who", string_value="Åsa")])) == \
        'greet(who="Åsa")'


# --------------------------------------------------------------------------------------------
# Against the fake sidecar


@pytest.fixture(scope="module")
def fake():
    with FakeSidecar() as sidecar:
        yield sidecar


def test_client_surfaces_emotion_and_actions(fake):
    events = asyncio.run(collect(fake.address, "shopkeeper", "I'll take it.", entities={"stock": ["hammer"]},
                                 allowed_actions=["sell_item", "open_gate"]))
    assert kinds(events) == ["started", "emotion", "delta", "delta", "action", "action", "finished"]
    assert events[1].emotion.label == "gruff"
    actions = [e.action for e in events if e.WhichOneof("event") == "action"]
    assert [format_action(a) for a in actions] == ['sell_item(item="hammer", price=40)', "open_gate()"]
    finished = events[-1].finished
    assert finished.emotion == "gruff" and list(finished.actions) == actions
    request = fake.last_request()
    assert {k: list(v.values) for k, v in request.entities.items()} == {"stock": ["hammer"]}
    assert list(request.allowed_actions.names) == ["sell_item", "open_gate"]


def test_say_returns_emotion_and_actions_in_finished(fake):
    async def say():
        async with NpcClient(fake.address, timeout=30) as npc:
            return await npc.say("shopkeeper", "Hi", allowed_actions=[])

    started, text, finished = asyncio.run(say())
    assert text == finished.full_text == "Forty gold, lad."
    assert finished.emotion == "gruff" and list(finished.actions) == []
    assert fake.last_request().HasField("allowed_actions")


def run_talk_py(address: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TALK_PY), "--address", address, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_talk_py_prints_emotion_line_and_actions(fake):
    done = run_talk_py(fake.address, "shopkeeper", "I'll take it.", "--entity", "stock=iron sword",
                       "--entity", "stock=hammer", "--allow-action", "sell_item", "--allow-action", "refuse")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ('[gruff] Forty gold, lad.\n'
                           '-> sell_item(item="iron sword", price=40)\n'
                           '-> refuse(note="say \\"please\\"", urgent=true, mood="loud")\n')
    assert "emotion gruff, actions 2" in done.stderr
    request = fake.last_request()
    assert list(request.entities["stock"].values) == ["iron sword", "hammer"]
    assert list(request.allowed_actions.names) == ["sell_item", "refuse"]

    done = run_talk_py(fake.address, "shopkeeper", "Hi", "--no-actions")
    assert done.returncode == 0 and done.stdout == "[gruff] Forty gold, lad.\n", done.stderr
    assert fake.last_request().HasField("allowed_actions") and not fake.last_request().allowed_actions.names
    done = run_talk_py(fake.address, "plain", "Hi")
    assert done.returncode == 0 and done.stdout == "Forty gold, lad.\n", done.stderr
    assert not fake.last_request().HasField("allowed_actions")

    done = run_talk_py(fake.address, "shopkeeper", "Hi", "--allow-action", "fly")
    assert done.returncode == 1 and "error: INVALID_ARGUMENT: allowed_actions" in done.stderr
    done = run_talk_py(fake.address, "shopkeeper", "Hi", "--entity", "no-equals-sign")
    assert done.returncode == 2 and "LIST=VALUE" in done.stderr


# --------------------------------------------------------------------------------------------
# Against a real sidecar


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("python-client") / "characters"
    proc = SidecarProcess(copy_characters(write_shop_character(root), ("oracle",)))
    yield proc
    proc.stop()


def declared(character: str) -> dict:
    return yaml.safe_load((REPO / "characters" / character / "character.yaml").read_text())


@pytest.mark.slow
def test_real_sidecar_emotion_comes_first_and_repeats_in_finished(server):
    events = asyncio.run(collect(server.address, "oracle", "Will I find my brother?", session_id="py-emotion",
                                 options=pb.GenerationOptions(max_tokens=16)))
    seen = kinds(events)
    assert in_order(seen), seen
    assert seen[1] == "emotion", seen  # oracle declares emotions: one, before the text
    label = events[1].emotion.label
    assert label in declared("oracle")["emotions"]
    finished = events[-1].finished
    assert finished.emotion == label
    assert "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta") == finished.full_text
    assert [e.action for e in events if e.WhichOneof("event") == "action"] == list(finished.actions)

    async def stored():
        async with NpcClient(server.address, timeout=30) as npc:
            state = await npc.export_session("py-emotion")
            await npc.reset_session("py-emotion")
            return state.turns[0]

    turn = asyncio.run(stored())
    assert turn.emotion == label and list(turn.actions) == list(finished.actions)


def _spec(action: dict) -> pb.ActionSpec:
    """What ListCharacters should say of one SHOP_ACTIONS entry (dialogue.proto's ActionSpec/ArgumentSpec)."""
    arguments = []
    for name, a in action.get("arguments", {}).items():
        arguments.append(pb.ArgumentSpec(
            name=name, type=a["type"], values=a.get("values", []), values_from=a.get("from", ""),
            min_value=a.get("min", 0), max_value=a.get("max", 0),
            max_chars=a.get("max_chars", 32) if a["type"] == "string" else 0,
        ))  # fmt: skip
    return pb.ActionSpec(name=action["name"], description=action["description"], arguments=arguments,
                         effects=action.get("effects", {}))


@pytest.mark.slow
def test_real_sidecar_lists_the_actions_a_character_declares(server):
    async def characters():
        async with NpcClient(server.address, timeout=30) as npc:
            return {c.id: c for c in await npc.list_characters()}

    listed = asyncio.run(characters())
    blacksmith = listed["blacksmith"]
    assert blacksmith.status == pb.CHARACTER_STATUS_READY, blacksmith.error
    assert list(blacksmith.actions) == [_spec(a) for a in SHOP_ACTIONS]
    assert list(blacksmith.emotions) == declared("blacksmith")["emotions"]
    assert [a.name for a in listed["oracle"].actions] == [a["name"] for a in declared("oracle").get("actions", [])]


@pytest.mark.slow
def test_real_sidecar_actions_follow_the_request(server):
    """Whatever actions the model takes are the character's, allowed, with the request's entities; an unknown
    name in allowed_actions is INVALID_ARGUMENT."""
    stock = ["iron sword", "steel axe"]
    for allowed in (None, ["sell_item"], []):
        events = asyncio.run(collect(server.address, "blacksmith", "I'll take the iron sword. Here is your gold.",
                                     entities={"stock": stock}, allowed_actions=allowed,
                                     options=pb.GenerationOptions(max_tokens=40)))
        assert in_order(kinds(events)), kinds(events)
        actions = [e.action for e in events if e.WhichOneof("event") == "action"]
        assert actions == list(events[-1].finished.actions)
        names = {a["name"] for a in SHOP_ACTIONS} if allowed is None else set(allowed)
        for action in actions:
            assert action.name in names, format_action(action)
            arguments = action_arguments(action)
            if action.name == "sell_item":
                assert arguments["item"] in stock and 1 <= arguments["price"] <= 1000, format_action(action)
            assert list(arguments) == list(next(a for a in SHOP_ACTIONS if a["name"] == action.name)
                                           .get("arguments", {}))

    with pytest.raises(grpc.aio.AioRpcError) as error:
        asyncio.run(collect(server.address, "blacksmith", "Hi", allowed_actions=["fly"]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fly" in error.value.details()


@pytest.mark.slow
def test_real_sidecar_talk_py(server):
    done = run_talk_py(server.address, "oracle", "Hello", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    first, *actions = done.stdout.splitlines()
    emotion = re.match(r"\[([a-z_]+)\] .", first)
    assert emotion and emotion[1] in declared("oracle")["emotions"], done.stdout
    assert all(line.startswith("-> ") for line in actions) and f"actions {len(actions)}" in done.stderr
