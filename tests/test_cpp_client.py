"""The C++ client (clients/cpp): built with CMake, then npc_talk and client_smoke run against a real `npc serve`.

Needs the C++ toolchain (Debian: cmake g++ pkg-config protobuf-compiler protobuf-compiler-grpc libgrpc++-dev
libprotobuf-dev). `make setup` installs it; without it every test here fails (CI installs it, so a silent skip
would hide a broken build). Builds land in /tmp/npc-cpp-build-<hash of the sources, options and toolchain> and
are reused while none of those change ($NPC_CPP_BUILD_DIR: a folder to put them in instead of /tmp).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from sidecar.client import NpcClient, format_action
from tests.client_fixtures import FakeSidecar, write_shop_character
from tests.sidecar_process import REPO, SidecarProcess, copy_characters

pytestmark = pytest.mark.slow  # builds C++ (~15 s on 2 cores, once per source change) and generates replies

CPP = REPO / "clients" / "cpp"
PROTO = REPO / "proto" / "npc" / "v1" / "dialogue.proto"
APT_PACKAGES = "cmake g++ pkg-config protobuf-compiler protobuf-compiler-grpc libgrpc++-dev libprotobuf-dev"
TOOLS = {"cmake": "cmake", "c++": "g++", "protoc": "protobuf-compiler", "grpc_cpp_plugin": "protobuf-compiler-grpc"}
SOURCE_FOLDERS = ("include", "src", "examples", "tests", "cmake")  # what the build reads, besides CMakeLists.txt
STALE_DAYS = 3
TIMEOUT = 300  # one reply on a busy CPU, first call included (it warms the model up)


def _missing_toolchain() -> list[str]:
    missing = [f"{tool} (Debian package {package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if shutil.which("pkg-config") is None:
        missing.append("pkg-config (Debian package pkg-config)")
    elif subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"]).returncode != 0:
        missing.append("gRPC C++ / protobuf development files (Debian packages libgrpc++-dev libprotobuf-dev)")
    return missing


def _build_key(options: tuple[str, ...]) -> str:
    """Hash of everything the build depends on: the sources, the proto, the options and the toolchain's versions."""
    digest = hashlib.sha256(" ".join(options).encode() + b"\0")
    files = [CPP / "CMakeLists.txt"] + sorted(p for folder in SOURCE_FOLDERS for p in (CPP / folder).rglob("*")
                                              if p.is_file())
    for path in [*files, PROTO]:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    for command in (["cmake", "--version"], ["c++", "--version"], ["protoc", "--version"],
                    ["pkg-config", "--modversion", "grpc++", "protobuf"]):
        digest.update(subprocess.run(command, capture_output=True, text=True).stdout.encode())
    return digest.hexdigest()[:16]


def _run_build(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        pytest.fail(f"{what} failed ({' '.join(command)}):\n{(done.stdout + done.stderr)[-6000:]}\n"
                    f"C++ toolchain: apt-get install --no-install-recommends {APT_PACKAGES}", pytrace=False)


def cmake_build(*options: str, binaries: tuple[str, ...]) -> Path:
    """clients/cpp configured with `options` and built, in a folder named after what it was built from: a build
    whose sources, options and toolchain have not changed is reused as it is."""
    missing = _missing_toolchain()
    if missing:
        pytest.fail("the C++ client cannot be built, missing: " + "; ".join(missing) +
                    f".\nInstall: apt-get install --no-install-recommends {APT_PACKAGES} (make setup does it)",
                    pytrace=False)
    options = ("-DCMAKE_BUILD_TYPE=Release", "-DNPC_WARNINGS_AS_ERRORS=ON", *options)
    override = os.environ.get("NPC_CPP_BUILD_DIR")
    key = _build_key(options)
    folder = Path(override) / key if override else Path(tempfile.gettempdir()) / f"npc-cpp-build-{key}"
    stamp = folder / ".npc-build-ok"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.lock", "w") as lock:  # one build at a time, also across pytest processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and all((folder / b).exists() for b in binaries)):
            _run_build(["cmake", "-S", str(CPP), "-B", str(folder), *options], "cmake configure")
            _run_build(["cmake", "--build", str(folder), f"-j{min(4, os.cpu_count() or 1)}"], "cmake build")
            stamp.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        stamp.touch()  # last used: builds unused for STALE_DAYS are removed
    if not override:
        _remove_stale_builds(folder.parent)
    return folder


def _remove_stale_builds(parent: Path) -> None:
    """Every source change makes a new build folder (~5 MB); forget those nobody used for STALE_DAYS."""
    for old in parent.glob("npc-cpp-build-*"):
        if old.suffix == ".lock" or not old.is_dir():
            continue
        try:
            stamp = old / ".npc-build-ok"
            used = (stamp if stamp.exists() else old).stat().st_mtime
        except OSError:  # removed meanwhile by another test run
            continue
        if time.time() - used > STALE_DAYS * 86400:
            shutil.rmtree(old, ignore_errors=True)
            Path(f"{old}.lock").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def build() -> Path:
    """The client built with the default flags: npc_talk and client_smoke."""
    return cmake_build(binaries=("npc_talk", "client_smoke"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = SidecarProcess(copy_characters(tmp_path_factory.mktemp("cpp") / "characters", ("oracle",)))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def fake():
    """A fake sidecar (tests/client_fixtures.py): fixed replies with an emotion and actions, no model."""
    with FakeSidecar() as sidecar:
        yield sidecar


@pytest.fixture(scope="module")
def action_server(tmp_path_factory):
    """A real sidecar with `blacksmith` declaring actions (client_fixtures.SHOP_ACTIONS) and emotions."""
    proc = SidecarProcess(write_shop_character(tmp_path_factory.mktemp("cpp-actions") / "characters"))
    yield proc
    proc.stop()


def declared_emotions(character: str) -> list[str]:
    return yaml.safe_load((REPO / "characters" / character / "character.yaml").read_text())["emotions"]


def npc_talk(build: Path, address: str, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    # The call's deadline as long as the wait: a busy CPU (CI, a training job) can take a minute over a reply.
    command = [str(build / "npc_talk"), "--address", address, "--deadline-ms", str(int(timeout * 1000)), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout + 30)


def test_npc_talk_streams_a_reply(build, server):
    """oracle declares emotions, so the line starts with one of them in brackets (the emotion event, before
    the text); the rest is the streamed text; then one line per action (oracle may declare some)."""
    done = npc_talk(build, server.address, "--character", "oracle", "--session", "cpp-talk", "--max-tokens", "8",
                    "Hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "no reply text"
    assert done.stdout.endswith("\n")
    assert "finish: " in done.stderr and "emotion: " in done.stderr and "first token: " in done.stderr

    async def stored_turn():
        async with NpcClient(server.address) as client:
            state = await client.export_session("cpp-talk")
            await client.reset_session("cpp-talk")
        return state.turns[0]

    turn = asyncio.run(stored_turn())
    emotion = re.match(r"\[([a-z_]+)\] ", done.stdout)
    assert emotion, f"no [emotion] before the line: {done.stdout!r}"
    assert emotion[1] in declared_emotions("oracle")
    # Finished.emotion and Finished.actions repeat the events.
    assert f"emotion: {emotion[1]}, actions: {len(turn.actions)}," in done.stderr
    # What npc_talk printed piece by piece is the whole reply, as the server stored it (Finished.full_text), then
    # the actions as the server stored them (npc_talk's FormatAction writes them as sidecar.client.format_action).
    actions = "".join(f"-> {format_action(a)}\n" for a in turn.actions)
    assert done.stdout == f"[{emotion[1]}] " + turn.npc_line + "\n" + actions
    assert turn.emotion == emotion[1]


@pytest.mark.parametrize("args,code,detail", [
    (("--character", "nobody", "Hi"), "NOT_FOUND", "nobody"),
    (("--character", "oracle", ""), "INVALID_ARGUMENT", "player_line"),
    (("--character", "oracle", "   "), "INVALID_ARGUMENT", "player_line"),
    (("--character", "oracle", "--max-tokens", "-1", "Hi"), "INVALID_ARGUMENT", "options.max_tokens"),
    (("--character", "BAD ID", "Hi"), "INVALID_ARGUMENT", "character_id"),
])
def test_npc_talk_reports_the_status_code(build, server, args, code, detail):
    done = npc_talk(build, server.address, *args)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {code}: ") and detail in error, done.stderr


def test_npc_talk_lists_characters(build, server):
    done = npc_talk(build, server.address, "--list")
    assert done.returncode == 0, done.stderr
    assert [line.split("\t")[:3] for line in done.stdout.splitlines()] == [["oracle", "The Oracle of Vell", "ready"]]


def test_npc_talk_without_a_server_is_unavailable(build):
    start = time.monotonic()
    for args in (("--list",), ("--character", "oracle", "Hello")):
        done = npc_talk(build, "127.0.0.1:9", *args, timeout=60)
        assert done.returncode == 1
        assert done.stderr.startswith("error: UNAVAILABLE: "), done.stderr
    assert time.monotonic() - start < 30  # fails fast, not at the 60 s deadline


def test_npc_talk_usage_errors(build):
    for args in ((), ("--character", "oracle"), ("--max-tokens", "lots", "--character", "oracle", "Hi"),
                 ("--frobnicate", "x"), ("--character", "oracle", "--entity", "no-equals-sign", "Hi"),
                 ("--character", "oracle", "--entity", "=value", "Hi"), ("--character", "oracle", "--allow-action")):
        done = npc_talk(build, "127.0.0.1:9", *args, timeout=30)
        assert done.returncode == 2, (args, done.stderr)
        assert "usage: npc_talk" in done.stderr


def test_client_smoke(build, server):
    """client_smoke: the callback order, streamed text == full_text, sessions, deadline, Cancel() after the
    first delta (CANCELLED, and the sidecar's active_sequences back to 0), the destructor, UNAVAILABLE."""
    done = subprocess.run([str(build / "client_smoke"), "--address", server.address, "--character", "oracle",
                           "--deadline-ms", str(TIMEOUT * 1000)], capture_output=True, text=True, timeout=1200)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "FAIL" not in report and "passed: 0 failure(s)" in report
    assert "ok: Cancel(): on_error(CANCELLED)" in report
    assert "ok: sidecar active_sequences back to 0 after cancel" in report


# --- emotion and actions, against the fake sidecar: what npc_talk prints and what it sends ---


def test_npc_talk_prints_emotion_then_line_then_actions(build, fake):
    done = npc_talk(build, fake.address, "--character", "shopkeeper", "--entity", "stock=iron sword", "I'll take it.")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ('[gruff] Forty gold, lad.\n'
                           '-> sell_item(item="iron sword", price=40)\n'
                           '-> open_gate()\n'
                           '-> refuse(note="say \\"please\\"", urgent=true, mood="loud")\n')
    assert "finish: STOP, emotion: gruff, actions: 3, " in done.stderr


def test_npc_talk_without_emotion_or_actions_prints_the_line_alone(build, fake):
    done = npc_talk(build, fake.address, "--character", "plain", "Hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Forty gold, lad.\n"
    assert "emotion: -, actions: 0, " in done.stderr


def test_npc_talk_sends_entities_and_allowed_actions(build, fake):
    done = npc_talk(build, fake.address, "--character", "shopkeeper", "--entity", "stock=iron sword",
                    "--entity", "stock=steel axe", "--entity", "coins=", "--entity", "note=a=b",
                    "--allow-action", "sell_item", "--allow-action", "refuse", "Hi")
    assert done.returncode == 0, done.stderr
    request = fake.last_request()
    assert {k: list(v.values) for k, v in request.entities.items()} == {
        "stock": ["iron sword", "steel axe"], "coins": [""], "note": ["a=b"]}
    assert request.HasField("allowed_actions") and list(request.allowed_actions.names) == ["sell_item", "refuse"]
    assert "open_gate" not in done.stdout and "-> sell_item(" in done.stdout and "-> refuse(" in done.stdout

    done = npc_talk(build, fake.address, "--character", "shopkeeper", "--no-actions", "Hi")
    assert done.returncode == 0, done.stderr
    request = fake.last_request()
    assert request.HasField("allowed_actions") and list(request.allowed_actions.names) == []  # set: no action
    assert done.stdout == "[gruff] Forty gold, lad.\n"

    done = npc_talk(build, fake.address, "--character", "shopkeeper", "Hi")
    request = fake.last_request()
    assert not request.HasField("allowed_actions") and not request.entities  # unset: every action
    assert done.stdout.splitlines()[1:] == ["-> open_gate()", '-> refuse(note="say \\"please\\"", urgent=true, '
                                            'mood="loud")']

    done = npc_talk(build, fake.address, "--character", "shopkeeper", "--allow-action", "fly", "Hi")
    assert done.returncode == 1 and done.stderr.startswith("error: INVALID_ARGUMENT: allowed_actions"), done.stderr


def test_npc_talk_lists_actions(build, fake):
    done = npc_talk(build, fake.address, "--list")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["plain\tPlain\tready", "shopkeeper\tShopkeeper\tready\t"
                                        "actions=sell_item,open_gate,refuse"]


# --- emotion and actions from the real sidecar (characters declaring them) ---


def test_client_smoke_actions(build, action_server):
    """client_smoke --only-actions on blacksmith with SHOP_ACTIONS: Character.actions listed, the entity limits
    in ServerInfo, replies with entities whose actions (if the model takes any) are valid and repeated in
    Finished, allowed_actions with one name and with none, and INVALID_ARGUMENT for an unknown action name and
    for entities beyond the limits."""
    done = subprocess.run([str(build / "client_smoke"), "--address", action_server.address, "--character",
                           "blacksmith", "--deadline-ms", str(TIMEOUT * 1000), "--only-actions"],
                          capture_output=True, text=True, timeout=1200)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "FAIL" not in report and "passed: 0 failure(s)" in report
    assert "ok: allowed_actions: an action the character lacks: INVALID_ARGUMENT before started" in report


def test_npc_talk_actions_against_the_sidecar(build, action_server):
    done = npc_talk(build, action_server.address, "--list")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split("\t")[:5] == ["blacksmith", "Brynja Emberforge", "ready", "adapter",
                                                           "actions=sell_item,refuse,open_gate"]
    stock = ["iron sword", "steel axe"]
    done = npc_talk(build, action_server.address, "--character", "blacksmith", "--max-tokens", "60",
                    *[a for item in stock for a in ("--entity", f"stock={item}")], "I'll take the iron sword. Here.")
    assert done.returncode == 0, done.stderr
    first, *actions = done.stdout.splitlines()
    emotion = re.match(r"\[([a-z_]+)\] .", first)
    assert emotion and emotion[1] in declared_emotions("blacksmith"), done.stdout
    assert len(actions) <= 3, done.stdout
    for line in actions:
        assert re.fullmatch(r'-> (sell_item\(item="(iron sword|steel axe)", price=\d+\)|open_gate\(\)'
                            r'|refuse\(note=".*", urgent=(true|false), mood="(calm|loud)"\))', line), done.stdout
    assert f"emotion: {emotion[1]}, actions: {len(actions)}, " in done.stderr
    done = npc_talk(build, action_server.address, "--character", "blacksmith", "--allow-action", "fly", "Hi")
    assert done.returncode == 1 and done.stderr.startswith("error: INVALID_ARGUMENT: ") and "fly" in done.stderr


def test_auth_token(build, tmp_path):
    proc = SidecarProcess(copy_characters(tmp_path / "characters", ("oracle",)), env={"NPC_AUTH_TOKEN": "s3cret"})
    try:
        for token, ok in ((None, False), ("wrong", False), ("s3cret", True)):
            done = npc_talk(build, proc.address, "--list", *(("--token", token) if token else ()))
            if ok:
                assert done.returncode == 0 and done.stdout.startswith("oracle\t"), done.stderr
            else:
                assert done.returncode == 1 and done.stderr.startswith("error: UNAUTHENTICATED: "), done.stderr
    finally:
        proc.stop()


def test_builds_and_runs_without_exceptions_and_rtti(server, fake):
    """As Unreal compiles a module: the client and the generated stubs with -fno-exceptions -fno-rtti
    (NPC_NO_EXCEPTIONS_NO_RTTI), linked with the distribution's gRPC, still stream a reply and report errors."""
    folder = cmake_build("-DNPC_NO_EXCEPTIONS_NO_RTTI=ON", "-DNPC_BUILD_TESTS=OFF",
                         "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", binaries=("npc_talk",))
    commands = json.loads((folder / "compile_commands.json").read_text())
    assert {Path(c["file"]).name for c in commands} >= {"dialogue.pb.cc", "dialogue.grpc.pb.cc", "dialogue_client.cpp",
                                                         "npc_talk.cpp"}
    assert all("-fno-exceptions" in c["command"] and "-fno-rtti" in c["command"] for c in commands)
    done = npc_talk(folder, server.address, "--character", "oracle", "--max-tokens", "4", "Hello")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    done = npc_talk(folder, server.address, "--character", "nobody", "Hello")
    assert done.returncode == 1 and done.stderr.startswith("error: NOT_FOUND: "), done.stderr
    done = npc_talk(folder, fake.address, "--character", "shopkeeper", "--entity", "stock=hammer", "Hi")
    assert done.returncode == 0 and done.stdout.startswith('[gruff] Forty gold, lad.\n-> sell_item(item="hammer", '
                                                           'price=40)\n'), done.stdout + done.stderr
