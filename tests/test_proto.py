"""The wire contract, proto/npc/v1/dialogue.proto, and the Python code generated from it."""

from __future__ import annotations

import shutil
import subprocess
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

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


def test_service_has_the_six_rpcs():
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
        for piece in ("Hello, ", request.player_name):
            yield pb.TalkEvent(delta=pb.TextDelta(text=piece))
        yield pb.TalkEvent(
            finished=pb.Finished(reason=pb.FINISH_REASON_STOP, full_text="Hello, " + request.player_name)
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
            events = list(
                stub.Talk(pb.TalkRequest(character_id="mira", player_line="Hi", player_name="Aria"), timeout=10)
            )
            assert [e.WhichOneof("event") for e in events] == ["started", "delta", "delta", "finished"]
            assert "".join(e.delta.text for e in events[1:-1]) == events[-1].finished.full_text == "Hello, Aria"
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
