"""The wire contract, proto/npc/v1/dialogue.proto, and the Python code generated from it."""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from sidecar import proto_gen
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from sidecar.pb.npc.v1 import dialogue_pb2_grpc as pb_grpc

PROTO_ROOT = proto_gen.REPO_PROTO_ROOT
DIALOGUE = "npc/v1/dialogue.proto"

# name -> (client streaming, server streaming, request, response)
RPCS = {
    "Talk": (False, True, "TalkRequest", "TalkEvent"),
    "ListCharacters": (False, False, "ListCharactersRequest", "ListCharactersResponse"),
    "ResetSession": (False, False, "ResetSessionRequest", "ResetSessionResponse"),
    "ExportSession": (False, False, "ExportSessionRequest", "SessionState"),
    "ImportSession": (False, False, "ImportSessionRequest", "ImportSessionResponse"),
    "GetServerInfo": (False, False, "GetServerInfoRequest", "ServerInfo"),
    "GetRelationships": (False, False, "GetRelationshipsRequest", "RelationshipsResponse"),
    "SetRelationship": (False, False, "SetRelationshipRequest", "RelationshipsResponse"),
    "StartScene": (False, True, "SceneRequest", "SceneEvent"),
}


def test_generated_code_is_up_to_date():
    problems = proto_gen.check()
    assert not problems, "sidecar/pb is stale, run `make proto`:\n" + "\n".join(problems)


def test_check_reports_a_stale_file(tmp_path: Path):
    proto_gen.generate(tmp_path)
    assert proto_gen.check(tmp_path) == []
    (tmp_path / "npc/v1/dialogue_pb2.py").write_text("# edited by hand\n")
    (tmp_path / "npc/v1/old_pb2.py").write_text("")
    assert proto_gen.check(tmp_path) == [
        f"not generated from any .proto: {tmp_path}/npc/v1/old_pb2.py",
        f"differs: {tmp_path}/npc/v1/dialogue_pb2.py",
    ]
    proto_gen.write_in_place(tmp_path)
    assert proto_gen.check(tmp_path) == []


def test_relative_imports():
    rewrite = proto_gen.relative_imports
    assert rewrite("from npc.v1 import a_pb2 as x\n", ["npc", "v1"], ["npc"]) == "from . import a_pb2 as x\n"
    assert rewrite("from npc.v2 import b_pb2\n", ["npc", "v1"], ["npc"]) == "from ..v2 import b_pb2\n"
    assert rewrite("from npc import c_pb2\n", ["npc", "v1"], ["npc"]) == "from .. import c_pb2\n"
    kept = "from google.protobuf import descriptor as _descriptor\n"
    assert rewrite(kept, ["npc", "v1"], ["npc"]) == kept
    with pytest.raises(RuntimeError, match="cannot rewrite"):
        rewrite("import npc.v1.a_pb2\n", ["npc", "v1"], ["npc"])


def test_service_has_its_rpcs():
    service = pb.DESCRIPTOR.services_by_name["NpcDialogue"]
    assert service.full_name == "npc.v1.NpcDialogue"
    assert pb.DESCRIPTOR.name == DIALOGUE and pb.DESCRIPTOR.package == "npc.v1"
    found = {
        m.name: (m.client_streaming, m.server_streaming, m.input_type.name, m.output_type.name) for m in service.methods
    }
    assert found == RPCS
    for name in RPCS:
        assert hasattr(pb_grpc.NpcDialogueStub(grpc.insecure_channel("localhost:1")), name)
        assert hasattr(pb_grpc.NpcDialogueServicer, name)


def test_enum_zero_values_are_unspecified():
    assert pb.FinishReason.Name(0) == "FINISH_REASON_UNSPECIFIED"
    assert pb.CharacterStatus.Name(0) == "CHARACTER_STATUS_UNSPECIFIED"
    assert [pb.FinishReason.Name(v) for v in (1, 2, 3)] == [
        "FINISH_REASON_STOP",
        "FINISH_REASON_LENGTH",
        "FINISH_REASON_CANCELLED",
    ]
    assert [pb.CharacterStatus.Name(v) for v in (1, 2)] == ["CHARACTER_STATUS_READY", "CHARACTER_STATUS_FAILED"]


def test_talk_request_round_trips_with_optional_presence():
    request = pb.TalkRequest(
        character_id="mira",
        session_id="save1/player",
        player_line="Got any swords? <|im_end|>",
        world={"time_of_day": "night", "weather": "rain"},
        options=pb.GenerationOptions(max_tokens=64, temperature=0.0, seed=2**64 - 1, stop=["\n\n"]),
        player_name="Aria",
    )
    back = pb.TalkRequest.FromString(request.SerializeToString())
    assert back == request
    assert back.options.HasField("temperature") and back.options.temperature == 0.0  # set to 0 != unset
    assert back.options.seed == 2**64 - 1
    assert not back.options.HasField("top_p") and not back.options.HasField("top_k")
    assert dict(back.world) == {"time_of_day": "night", "weather": "rain"}
    assert not pb.TalkRequest().HasField("options")


def test_talk_events_round_trip():
    events = [
        pb.TalkEvent(
            started=pb.Started(
                request_id="r1", character_version="v3", prompt_tokens=120, cached_prompt_tokens=96, history_turns=2
            )
        ),
        pb.TalkEvent(delta=pb.TextDelta(text="Aye, ")),
        pb.TalkEvent(delta=pb.TextDelta(text="fine steel.")),
        pb.TalkEvent(
            finished=pb.Finished(
                reason=pb.FINISH_REASON_STOP,
                full_text="Aye, fine steel.",
                usage=pb.Usage(prompt_tokens=120, completion_tokens=6, cached_prompt_tokens=96),
                timings=pb.Timings(queue_ms=0.5, first_token_ms=41.25, total_ms=130.0),
            )
        ),
    ]
    back = [pb.TalkEvent.FromString(e.SerializeToString()) for e in events]
    assert back == events
    assert [e.WhichOneof("event") for e in back] == ["started", "delta", "delta", "finished"]
    assert "".join(e.delta.text for e in back[1:3]) == back[3].finished.full_text


# Issue 15 (emotion before the line, actions after it): field -> (number, type, label) as the spec gives them.
_T = descriptor_pb2.FieldDescriptorProto
ISSUE_15_FIELDS = {
    "TalkRequest.entities": (7, _T.TYPE_MESSAGE, "repeated"),  # a map
    "TalkRequest.allowed_actions": (8, _T.TYPE_MESSAGE, "optional"),
    "EntityList.values": (1, _T.TYPE_STRING, "repeated"),
    "AllowedActions.names": (1, _T.TYPE_STRING, "repeated"),
    "TalkEvent.emotion": (4, _T.TYPE_MESSAGE, "optional"),
    "TalkEvent.action": (5, _T.TYPE_MESSAGE, "optional"),
    "Emotion.label": (1, _T.TYPE_STRING, "optional"),
    "Action.name": (1, _T.TYPE_STRING, "optional"),
    "Action.arguments": (2, _T.TYPE_MESSAGE, "repeated"),
    "Action.arguments_json": (3, _T.TYPE_STRING, "optional"),
    "ActionArgument.name": (1, _T.TYPE_STRING, "optional"),
    "ActionArgument.string_value": (2, _T.TYPE_STRING, "optional"),
    "ActionArgument.int_value": (3, _T.TYPE_INT64, "optional"),
    "ActionArgument.bool_value": (4, _T.TYPE_BOOL, "optional"),
    "Finished.emotion": (5, _T.TYPE_STRING, "optional"),
    "Finished.actions": (6, _T.TYPE_MESSAGE, "repeated"),
    "Turn.emotion": (6, _T.TYPE_STRING, "optional"),
    "Turn.actions": (7, _T.TYPE_MESSAGE, "repeated"),
    "Character.actions": (10, _T.TYPE_MESSAGE, "repeated"),
    "ActionSpec.name": (1, _T.TYPE_STRING, "optional"),
    "ActionSpec.description": (2, _T.TYPE_STRING, "optional"),
    "ActionSpec.arguments": (3, _T.TYPE_MESSAGE, "repeated"),
    "ActionSpec.effects": (4, _T.TYPE_MESSAGE, "repeated"),  # a map
    "ArgumentSpec.name": (1, _T.TYPE_STRING, "optional"),
    "ArgumentSpec.type": (2, _T.TYPE_STRING, "optional"),
    "ArgumentSpec.values": (3, _T.TYPE_STRING, "repeated"),
    "ArgumentSpec.values_from": (4, _T.TYPE_STRING, "optional"),
    "ArgumentSpec.min_value": (5, _T.TYPE_INT64, "optional"),
    "ArgumentSpec.max_value": (6, _T.TYPE_INT64, "optional"),
    "ArgumentSpec.max_chars": (7, _T.TYPE_INT32, "optional"),
    "RequestLimits.max_entity_lists": (9, _T.TYPE_INT32, "optional"),
    "RequestLimits.max_entity_values": (10, _T.TYPE_INT32, "optional"),
    "RequestLimits.max_entity_chars": (11, _T.TYPE_INT32, "optional"),
}


def _declared(table: dict) -> dict:
    """Each "Message.field" of `table` as the proto declares it: (number, type, label)."""
    found = {}
    for name in table:
        message, field = name.split(".")
        f = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name[field]
        found[name] = (f.number, f.type, "repeated" if f.is_repeated else "optional")
    return found


def test_issue_15_fields_have_the_agreed_numbers_and_types():
    assert _declared(ISSUE_15_FIELDS) == ISSUE_15_FIELDS
    assert pb.TalkRequest.DESCRIPTOR.fields_by_name["entities"].message_type.GetOptions().map_entry
    assert pb.TalkRequest.DESCRIPTOR.fields_by_name["entities"].message_type.fields_by_name["value"].message_type \
        == pb.EntityList.DESCRIPTOR
    assert pb.ActionSpec.DESCRIPTOR.fields_by_name["effects"].message_type.GetOptions().map_entry
    oneof = pb.TalkEvent.DESCRIPTOR.oneofs_by_name["event"]
    assert [f.name for f in oneof.fields] == ["started", "delta", "finished", "emotion", "action"]
    assert [f.name for f in pb.ActionArgument.DESCRIPTOR.oneofs_by_name["value"].fields] == [
        "string_value", "int_value", "bool_value"]


# Scenes (issue 17): numbers and types fixed once shipped.
ISSUE_17_FIELDS = {
    "Turn.scene_id": (8, _T.TYPE_STRING, "optional"),
    "SessionState.scenes": (6, _T.TYPE_MESSAGE, "repeated"),
    "SceneState.scene_id": (1, _T.TYPE_STRING, "optional"),
    "SceneState.situation": (2, _T.TYPE_STRING, "optional"),
    "SceneState.character_ids": (3, _T.TYPE_STRING, "repeated"),
    "RequestLimits.max_scene_characters": (12, _T.TYPE_INT32, "optional"),
    "RequestLimits.max_scene_lines": (13, _T.TYPE_INT32, "optional"),
    "SceneRequest.character_ids": (1, _T.TYPE_STRING, "repeated"),
    "SceneRequest.situation": (2, _T.TYPE_STRING, "optional"),
    "SceneRequest.session_id": (3, _T.TYPE_STRING, "optional"),
    "SceneRequest.world": (4, _T.TYPE_MESSAGE, "repeated"),  # a map
    "SceneRequest.max_lines": (5, _T.TYPE_INT32, "optional"),
    "SceneRequest.options": (6, _T.TYPE_MESSAGE, "optional"),
    "SceneRequest.entities": (7, _T.TYPE_MESSAGE, "repeated"),  # a map
    "SceneRequest.allowed_actions": (8, _T.TYPE_MESSAGE, "optional"),
    "SceneStarted.scene_id": (1, _T.TYPE_STRING, "optional"),
    "SceneStarted.character_ids": (2, _T.TYPE_STRING, "repeated"),
    "SceneStarted.names": (3, _T.TYPE_STRING, "repeated"),
    "SceneLine.index": (1, _T.TYPE_UINT32, "optional"),
    "SceneLine.character_id": (2, _T.TYPE_STRING, "optional"),
    "SceneLine.event": (3, _T.TYPE_MESSAGE, "optional"),
    "SceneFinished.reason": (1, _T.TYPE_ENUM, "optional"),
    "SceneFinished.lines": (2, _T.TYPE_UINT32, "optional"),
}


def test_issue_17_fields_have_the_agreed_numbers_and_types():
    assert _declared(ISSUE_17_FIELDS) == ISSUE_17_FIELDS
    assert [f.name for f in pb.SceneEvent.DESCRIPTOR.oneofs_by_name["event"].fields] == [
        "started", "line", "finished"]
    assert pb.SceneLine.DESCRIPTOR.fields_by_name["event"].message_type == pb.TalkEvent.DESCRIPTOR


def test_the_talk_rpc_documents_every_event_in_order(tmp_path: Path):
    out = tmp_path / "dialogue.pb"
    proto_gen.run_protoc(PROTO_ROOT, [DIALOGUE], ["--include_source_info", f"--descriptor_set_out={out}"])
    (proto,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    talk = [i for i, m in enumerate(proto.service[0].method) if m.name == "Talk"][0]
    (comment,) = [loc.leading_comments for loc in proto.source_code_info.location if list(loc.path) == [6, 0, 2, talk]]
    # One line per event, in stream order: "  started ...", "  emotion ...", "  delta ...", ...
    order = [line.split()[0] for line in comment.splitlines() if line.startswith("   ") and line.split()
             and line.split()[0] in pb.TalkEvent.DESCRIPTOR.fields_by_name]
    assert order == ["started", "emotion", "delta", "action", "finished"]


def test_talk_request_entities_and_allowed_actions():
    request = pb.TalkRequest(character_id="blacksmith", player_line="The sword, please.")
    request.entities["stock"].values.extend(["iron sword", "steel axe"])
    request.entities["empty"].SetInParent()
    back = pb.TalkRequest.FromString(request.SerializeToString())
    assert {k: list(v.values) for k, v in back.entities.items()} == {"stock": ["iron sword", "steel axe"], "empty": []}
    # allowed_actions: unset (every action) differs from set with no names (no action).
    assert not back.HasField("allowed_actions")
    back.allowed_actions.SetInParent()
    again = pb.TalkRequest.FromString(back.SerializeToString())
    assert again.HasField("allowed_actions") and list(again.allowed_actions.names) == []
    again.allowed_actions.names.append("sell_item")
    assert list(pb.TalkRequest.FromString(again.SerializeToString()).allowed_actions.names) == ["sell_item"]


def _sell(item: str = "iron sword", price: int = 40) -> pb.Action:
    return pb.Action(
        name="sell_item",
        arguments=[pb.ActionArgument(name="item", string_value=item), pb.ActionArgument(name="price", int_value=price)],
        arguments_json=f'{{"item": "{item}", "price": {price}}}',
    )


def test_emotion_and_action_events_round_trip():
    events = [
        pb.TalkEvent(started=pb.Started(request_id="r1")),
        pb.TalkEvent(emotion=pb.Emotion(label="gruff")),
        pb.TalkEvent(delta=pb.TextDelta(text="Forty gold, lad.")),
        pb.TalkEvent(action=_sell()),
        pb.TalkEvent(action=pb.Action(name="open_gate", arguments_json="{}")),
        pb.TalkEvent(finished=pb.Finished(reason=pb.FINISH_REASON_STOP, full_text="Forty gold, lad.", emotion="gruff",
                                          actions=[_sell(), pb.Action(name="open_gate", arguments_json="{}")])),
    ]
    back = [pb.TalkEvent.FromString(e.SerializeToString()) for e in events]
    assert back == events
    assert [e.WhichOneof("event") for e in back] == ["started", "emotion", "delta", "action", "action", "finished"]
    sell = back[3].action
    assert [(a.name, a.WhichOneof("value")) for a in sell.arguments] == [("item", "string_value"),
                                                                        ("price", "int_value")]
    assert json.loads(sell.arguments_json) == {"item": "iron sword", "price": 40}
    assert list(back[-1].finished.actions) == [back[3].action, back[4].action]
    assert back[-1].finished.emotion == back[1].emotion.label
    flag = pb.ActionArgument(name="urgent", bool_value=False)  # false is set, not absent, in a oneof
    assert pb.ActionArgument.FromString(flag.SerializeToString()).WhichOneof("value") == "bool_value"


def test_a_client_built_before_issue_15_reads_a_new_reply():
    """The proto as it was before emotion/action events (those fields taken out) parses what a new server
    sends: an emotion or action event is an event of no kind it knows (to be ignored), and Finished keeps
    what it had."""
    old = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(old)
    dropped = {"TalkEvent": {"emotion", "action"}, "Finished": {"actions"}}
    for message in old.message_type:
        keep = [f for f in message.field if f.name not in dropped.get(message.name, ())]
        del message.field[:]
        message.field.extend(keep)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(old)
    old_event = message_factory.GetMessageClass(pool.FindMessageTypeByName("npc.v1.TalkEvent"))
    for new in (pb.TalkEvent(emotion=pb.Emotion(label="gruff")), pb.TalkEvent(action=_sell())):
        assert old_event.FromString(new.SerializeToString()).WhichOneof("event") is None
    finished = pb.TalkEvent(finished=pb.Finished(full_text="Hi", emotion="gruff", actions=[_sell()]))
    parsed = old_event.FromString(finished.SerializeToString())
    assert parsed.WhichOneof("event") == "finished" and parsed.finished.full_text == "Hi"
    assert parsed.finished.emotion == "gruff"


def test_characters_turns_and_limits_carry_the_new_fields():
    character = pb.Character(
        id="blacksmith", emotions=["gruff", "proud"],
        actions=[pb.ActionSpec(name="sell_item", description="Sell an item.", effects={"gold": "+price"}, arguments=[
            pb.ArgumentSpec(name="item", type="enum", values_from="stock"),
            pb.ArgumentSpec(name="price", type="integer", min_value=1, max_value=1000),
            pb.ArgumentSpec(name="note", type="string", max_chars=40),
            pb.ArgumentSpec(name="urgent", type="boolean"),
            pb.ArgumentSpec(name="mood", type="enum", values=["calm", "loud"]),
        ])],
    )  # fmt: skip
    assert pb.Character.FromString(character.SerializeToString()) == character
    turn = pb.Turn(character_id="blacksmith", player_line="Sword?", npc_line="Forty gold.", emotion="gruff",
                   actions=[_sell()])
    state = pb.SessionState(format_version=1, session_id="s", turns=[turn])
    assert pb.SessionState.FromString(state.SerializeToString()).turns[0] == turn
    limits = pb.RequestLimits(max_entity_lists=16, max_entity_values=64, max_entity_chars=64)
    assert pb.ServerInfo.FromString(pb.ServerInfo(limits=limits).SerializeToString()).limits == limits


def test_session_state_round_trips():
    state = pb.SessionState(
        format_version=1,
        session_id="save1/player",
        turns=[
            pb.Turn(
                character_id="mira",
                player_line="Hi",
                npc_line="Well met.",
                player_name="Aria",
                character_version="0123456789ab",
            ),
            pb.Turn(character_id="oracle", player_line="Bye"),
        ],
        updated_unix_ms=1_700_000_000_000,
    )
    request = pb.ImportSessionRequest(state=state, overwrite=True)
    assert pb.ImportSessionRequest.FromString(request.SerializeToString()) == request
    listing = pb.ListCharactersResponse(
        characters=[
            pb.Character(
                id="mira",
                name="Mira",
                version="v3",
                status=pb.CHARACTER_STATUS_FAILED,
                error="bad yaml",
                has_adapter=True,
                greeting="Welcome!",
                emotions=["angry", "amused"],
                serving=True,
            )
        ]
    )
    assert pb.ListCharactersResponse.FromString(listing.SerializeToString()) == listing


def _documented_elements(proto: descriptor_pb2.FileDescriptorProto):
    """(source path, name) of every service, rpc, message, field, enum and enum value."""

    def messages(items, path, prefix):
        for i, m in enumerate(items):
            here = (*path, i)
            if not m.options.map_entry:
                yield here, f"{prefix}{m.name}"
                for j, f in enumerate(m.field):
                    yield (*here, 2, j), f"{prefix}{m.name}.{f.name}"
            yield from messages(m.nested_type, (*here, 3), f"{prefix}{m.name}.")
            yield from enums(m.enum_type, (*here, 4), f"{prefix}{m.name}.")

    def enums(items, path, prefix):
        for i, e in enumerate(items):
            yield (*path, i), f"{prefix}{e.name}"
            for j, v in enumerate(e.value):
                yield (*path, i, 2, j), f"{prefix}{e.name}.{v.name}"

    yield from messages(proto.message_type, (4,), "")
    yield from enums(proto.enum_type, (5,), "")
    for i, s in enumerate(proto.service):
        yield (6, i), s.name
        for j, m in enumerate(s.method):
            yield (6, i, 2, j), f"{s.name}.{m.name}"


def test_every_element_of_the_contract_is_documented(tmp_path: Path):
    out = tmp_path / "dialogue.pb"
    proto_gen.run_protoc(PROTO_ROOT, [DIALOGUE], ["--include_source_info", f"--descriptor_set_out={out}"])
    (proto,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    commented = {
        tuple(loc.path)
        for loc in proto.source_code_info.location
        if loc.leading_comments.strip() or loc.trailing_comments.strip()
    }
    missing = [name for path, name in _documented_elements(proto) if path not in commented]
    assert not missing, f"document these in {DIALOGUE}: {missing}"


class _FakeDialogue(pb_grpc.NpcDialogueServicer):
    def Talk(self, request, context):
        yield pb.TalkEvent(started=pb.Started(request_id="r1"))
        yield pb.TalkEvent(emotion=pb.Emotion(label="gruff"))
        for piece in ("Hello, ", request.player_name):
            yield pb.TalkEvent(delta=pb.TextDelta(text=piece))
        actions = [_sell(item) for item in request.entities["stock"].values]
        for action in actions:
            yield pb.TalkEvent(action=action)
        yield pb.TalkEvent(
            finished=pb.Finished(reason=pb.FINISH_REASON_STOP, full_text="Hello, " + request.player_name,
                                 emotion="gruff", actions=actions)
        )

    def ExportSession(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, f"session_id: no conversation {request.session_id!r}")


def test_generated_grpc_code_works_over_a_socket():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_NpcDialogueServicer_to_server(_FakeDialogue(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.NpcDialogueStub(channel)
            request = pb.TalkRequest(character_id="mira", player_line="Hi", player_name="Aria")
            request.entities["stock"].values.append("hammer")
            events = list(stub.Talk(request, timeout=10))
            kinds = [e.WhichOneof("event") for e in events]
            assert kinds == ["started", "emotion", "delta", "delta", "action", "finished"]
            assert "".join(e.delta.text for e in events if e.delta.text) == events[-1].finished.full_text
            assert events[-1].finished.full_text == "Hello, Aria"
            assert events[-2].action == _sell("hammer") and list(events[-1].finished.actions) == [events[-2].action]
            with pytest.raises(grpc.RpcError) as error:
                stub.ExportSession(pb.ExportSessionRequest(character_id="mira", session_id="s"), timeout=10)
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as error:
                stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None)


def test_proto_compiles_with_system_protoc_for_cpp_and_csharp(tmp_path: Path):
    """Debian's protoc (package protobuf-compiler), as the C++ and C# clients use it. Where g++ and
    protobuf's headers (libprotobuf-dev) are installed too, the C++ messages must also compile as
    Unreal builds them: without RTTI and exceptions."""
    protoc = shutil.which("protoc")
    if protoc is None:
        pytest.skip("no system protoc on PATH (Debian package protobuf-compiler)")
    cpp, csharp = tmp_path / "cpp", tmp_path / "csharp"
    cpp.mkdir()
    csharp.mkdir()
    args = [protoc, f"-I{PROTO_ROOT}", f"--cpp_out={cpp}", f"--csharp_out={csharp}"]
    plugin = shutil.which("grpc_cpp_plugin")  # Debian package protobuf-compiler-grpc
    if plugin:
        args += [f"--plugin=protoc-gen-grpc={plugin}", f"--grpc_out={cpp}"]
    done = subprocess.run([*args, DIALOGUE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (cpp / "npc/v1/dialogue.pb.h").is_file() and (cpp / "npc/v1/dialogue.pb.cc").is_file()
    if plugin:
        assert (cpp / "npc/v1/dialogue.grpc.pb.h").is_file()
    cs = (csharp / "Dialogue.cs").read_text()
    assert "namespace Npc.V1" in cs and "public sealed partial class TalkRequest" in cs

    gxx = shutil.which("g++")
    if gxx and Path("/usr/include/google/protobuf/message.h").is_file():
        for flags in ([], ["-fno-rtti", "-fno-exceptions", "-DGOOGLE_PROTOBUF_NO_RTTI"]):
            cmd = [gxx, "-std=c++17", "-fsyntax-only", *flags, f"-I{cpp}", str(cpp / "npc/v1/dialogue.pb.cc")]
            done = subprocess.run(cmd, capture_output=True, text=True)
            assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
