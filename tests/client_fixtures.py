"""Helpers of the client tests (C++, Python): a fake sidecar that answers with hand-built events, and a
character folder that declares actions, for a real `npc serve`.

The fake sidecar is an in-process gRPC server of npc.v1.NpcDialogue (sidecar/pb): its Talk answers with a
fixed reply in the order dialogue.proto gives (started, emotion, delta..., action..., finished) and keeps
every TalkRequest it received, so a client test can check both what the client surfaces and what it sent,
without a model and whatever the real server does yet.
"""

from __future__ import annotations

import json
import shutil
import threading
from concurrent import futures
from pathlib import Path

import grpc
import yaml

from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from sidecar.pb.npc.v1 import dialogue_pb2_grpc as pb_grpc
from tests.sidecar_process import REPO

__all__ = ["FakeSidecar", "SHOP_ACTIONS", "FAKE_EMOTION", "FAKE_TEXT", "fake_actions", "write_shop_character"]

FAKE_EMOTION = "gruff"
FAKE_TEXT = ["Forty gold, ", "lad."]


def _action(name: str, **arguments: str | int | bool) -> pb.Action:
    action = pb.Action(name=name, arguments_json=json.dumps(arguments))
    for key, value in arguments.items():
        if isinstance(value, bool):
            action.arguments.add(name=key, bool_value=value)
        elif isinstance(value, int):
            action.arguments.add(name=key, int_value=value)
        else:
            action.arguments.add(name=key, string_value=value)
    return action


def fake_actions(request: pb.TalkRequest) -> list[pb.Action]:
    """The actions of the fake reply: sell_item takes the first value of the request's entities["stock"]
    (so a test sees the entities arrived), then open_gate (no arguments) and refuse (a string to quote,
    a boolean, an enum), less those the request's allowed_actions leaves out."""
    stock = list(request.entities["stock"].values) if "stock" in request.entities else []
    actions = [_action("sell_item", item=stock[0], price=40)] if stock else []
    actions += [_action("open_gate"), _action("refuse", note='say "please"', urgent=True, mood="loud")]
    if request.HasField("allowed_actions"):
        actions = [a for a in actions if a.name in request.allowed_actions.names]
    return actions


# The fake characters: "shopkeeper" has emotions and actions, "plain" neither (the stream of an older server).
FAKE_CHARACTERS = [
    pb.Character(
        id="plain", name="Plain", version="v1", status=pb.CHARACTER_STATUS_READY, serving=True,
    ),
    pb.Character(
        id="shopkeeper", name="Shopkeeper", version="v1", status=pb.CHARACTER_STATUS_READY, serving=True,
        emotions=["gruff", "proud"],
        actions=[
            pb.ActionSpec(name="sell_item", description="Sell an item.", effects={"gold": "+price"}, arguments=[
                pb.ArgumentSpec(name="item", type="enum", values_from="stock"),
                pb.ArgumentSpec(name="price", type="integer", min_value=1, max_value=1000),
            ]),
            pb.ActionSpec(name="open_gate", description="Open the gate."),
            pb.ActionSpec(name="refuse", description="Refuse.", arguments=[
                pb.ArgumentSpec(name="note", type="string", max_chars=40),
                pb.ArgumentSpec(name="urgent", type="boolean"),
                pb.ArgumentSpec(name="mood", type="enum", values=["calm", "loud"]),
            ]),
        ],
    ),
]  # fmt: skip


class _FakeDialogue(pb_grpc.NpcDialogueServicer):
    def __init__(self, owner: FakeSidecar):
        self.owner = owner

    def Talk(self, request, context):
        with self.owner.lock:
            self.owner.requests.append(pb.TalkRequest.FromString(request.SerializeToString()))
        if request.character_id not in {c.id for c in FAKE_CHARACTERS}:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown character {request.character_id!r}")
        if request.HasField("allowed_actions"):
            unknown = [n for n in request.allowed_actions.names if n not in {"sell_item", "open_gate", "refuse"}]
            if unknown:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"allowed_actions.names: unknown action {unknown[0]!r}")
        shop = request.character_id == "shopkeeper"
        yield pb.TalkEvent(started=pb.Started(request_id="fake-1", character_version="v1"))
        if shop:
            yield pb.TalkEvent(emotion=pb.Emotion(label=FAKE_EMOTION))
        for piece in FAKE_TEXT:
            yield pb.TalkEvent(delta=pb.TextDelta(text=piece))
        actions = fake_actions(request) if shop else []
        for action in actions:
            yield pb.TalkEvent(action=action)
        yield pb.TalkEvent(finished=pb.Finished(
            reason=pb.FINISH_REASON_STOP, full_text="".join(FAKE_TEXT), emotion=FAKE_EMOTION if shop else "",
            actions=actions, usage=pb.Usage(prompt_tokens=10, completion_tokens=12),
            timings=pb.Timings(queue_ms=0.1, first_token_ms=1.0, total_ms=2.0),
        ))  # fmt: skip

    def ListCharacters(self, request, context):
        return pb.ListCharactersResponse(characters=FAKE_CHARACTERS)

    def GetServerInfo(self, request, context):
        return pb.ServerInfo(version="fake", max_tokens_limit=512, limits=pb.RequestLimits(
            max_entity_lists=16, max_entity_values=64, max_entity_chars=64))  # fmt: skip


class FakeSidecar:
    """`with FakeSidecar() as fake:` a fake sidecar on 127.0.0.1:<free port> (`fake.address`); the
    TalkRequests it received are in `fake.requests`, oldest first."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[pb.TalkRequest] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_NpcDialogueServicer_to_server(_FakeDialogue(self), self._server)
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self) -> FakeSidecar:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(None)

    def last_request(self) -> pb.TalkRequest:
        with self.lock:
            return self.requests[-1]


# What the real character of the action tests declares (character.yaml `actions`, as in the spec):
# every argument type, an action without arguments, and effects.
SHOP_ACTIONS = [
    {"name": "sell_item", "description": "Sell the customer an item from your stock.",
     "arguments": {"item": {"type": "enum", "from": "stock"}, "price": {"type": "integer", "min": 1, "max": 1000}},
     "effects": {"gold": "+price"}},
    {"name": "refuse", "description": "Refuse the customer, with a short note.",
     "arguments": {"note": {"type": "string", "max_chars": 40}, "urgent": {"type": "boolean"},
                   "mood": {"type": "enum", "values": ["calm", "loud"]}}},
    {"name": "open_gate", "description": "Open the gate of the forge yard."},
]  # fmt: skip


def write_shop_character(root: Path, cid: str = "blacksmith") -> Path:
    """characters/blacksmith copied under root (adapter included), its character.yaml given SHOP_ACTIONS
    (replacing any actions it declares). Returns the characters folder (root)."""
    folder = root / cid
    shutil.copytree(REPO / "characters" / "blacksmith", folder)
    path = folder / "character.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["id"] = cid
    data["actions"] = SHOP_ACTIONS
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return root
