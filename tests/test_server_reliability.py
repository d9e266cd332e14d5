"""Faults and defaults over a real socket: SIGTERM under load with a session store, an adapter
overwritten with garbage, configurable limits, and what a server bound beyond loopback says."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest

from sidecar.client import NpcClient
from sidecar.config import EngineConfig, RequestLimits, ServerConfig
from sidecar.dialogue.characters import load_character
from sidecar.dialogue.sessions import SessionStore
from sidecar.dialogue.turn import Dialogue
from sidecar.engine.api import EngineEvent, RequestStream
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from sidecar.server.app import is_loopback
from sidecar.server.service import DialogueService
from tests.sidecar_process import SidecarProcess, copy_characters, write_character

DONE = (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


def run(coro):
    return asyncio.run(coro)


async def _wait_for(predicate, timeout: float = 15.0):
    deadline = time.time() + timeout
    while not (result := await predicate()):
        if time.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)
    return result


def test_sigterm_under_load_keeps_every_finished_turn(tmp_path):
    """Clients talk in their own sessions; SIGTERM arrives mid-reply. Every turn whose Finished a
    client received is in the session store and comes back after a restart, in order."""
    root = copy_characters(tmp_path / "characters", ("blacksmith", "oracle"))
    store = tmp_path / "sessions.jsonl"
    server = SidecarProcess(root, "--session-store", str(store), "--grace", "1", "--max-batch", "4")
    received: dict[str, list[tuple[str, str]]] = {}
    outcomes: list[str] = []

    async def player(client: NpcClient, n: int) -> None:
        session, turns = f"slot{n}/player", received.setdefault(f"slot{n}/player", [])
        for i in range(100):
            line = f"Player {n} asks question {i}: what news?"
            try:
                _, _, finished = await client.say(("blacksmith", "oracle")[n % 2], line, session_id=session,
                                                  options=pb.GenerationOptions(max_tokens=24, temperature=0.8))
            except grpc.aio.AioRpcError as e:
                outcomes.append(e.code().name)
                return
            if finished.reason in DONE:
                turns.append((line, finished.full_text))
                if sum(len(t) for t in received.values()) >= 8:
                    loaded.set()
            else:
                outcomes.append(pb.FinishReason.Name(finished.reason))
                return

    loaded = asyncio.Event()

    async def go():
        async with NpcClient(server.address) as client:
            players = [asyncio.create_task(player(client, n)) for n in range(6)]
            await asyncio.wait_for(loaded.wait(), 180)
            await asyncio.sleep(0.3)  # replies of every player in flight
            server.proc.send_signal(15)
            await asyncio.gather(*players)

    try:
        run(go())
        assert server.proc.wait(20) == 0, "".join(server.log[-20:])
    finally:
        server.stop()
    assert set(outcomes) <= {"UNAVAILABLE", "CANCELLED", "FINISH_REASON_CANCELLED"}, outcomes

    restarted = SidecarProcess(root, "--session-store", str(store))
    try:
        async def exported():
            async with NpcClient(restarted.address) as client:
                return {sid: [(t.player_line, t.npc_line) for t in (await client.export_session(sid)).turns]
                        for sid, turns in received.items() if turns}

        assert run(exported()) == {sid: turns for sid, turns in received.items() if turns}
    finally:
        restarted.stop()


class _ScoringNeverEnds:
    """An engine whose replies finish at once and whose emotion scoring runs until it is cancelled."""

    name = "fake"
    config = EngineConfig()

    def __init__(self, tokenizer):
        self.model = type("Model", (), {"tokenizer": tokenizer})()
        self.scoring = asyncio.Event()

    def queue_full(self) -> bool:
        return False

    def submit(self, prompt_ids, adapter, sampling, *, choices=None, timings=None) -> RequestStream:
        queue: asyncio.Queue = asyncio.Queue()
        if choices is None:
            for event in (EngineEvent("started", "reply", prompt_tokens=len(prompt_ids)),
                          EngineEvent("delta", "reply", text="Halt."),
                          EngineEvent("finished", "reply", text="Halt.", finish_reason="stop", completion_tokens=3)):
                queue.put_nowait(event)
            return RequestStream("reply", queue, lambda _: None)
        self.scoring.set()
        return RequestStream("scoring", queue, lambda rid: queue.put_nowait(
            EngineEvent("finished", rid, finish_reason="cancelled")))


def test_grace_cut_reaches_emotion_scoring(tmp_path, tokenizer):
    """SIGTERM's grace period ends while a reply's text is done and its emotion is being scored: the
    cut (cancel_all) ends the scoring too, and the reply finishes at once with its reason, its turn and
    the first label, instead of outliving the grace period by the scoring's time."""
    root = tmp_path / "characters"
    write_character(root, "guard", "You are a guard.", emotions="[bored, stern]")
    character = load_character(root / "guard")
    engine = _ScoringNeverEnds(tokenizer)
    sessions = SessionStore()
    dialogue = Dialogue(engine, type("Registry", (), {"get_serving": lambda self, cid: (character, None)})(),
                        sessions, ServerConfig().limits)
    service = DialogueService(dialogue)

    async def go():
        request = pb.TalkRequest(character_id="guard", player_line="Hello", session_id="s")
        talk = asyncio.ensure_future(_events(service.Talk(request, context=None)))
        await asyncio.wait_for(engine.scoring.wait(), 5)
        assert dialogue.cancel_all() == 1
        return await asyncio.wait_for(talk, 2)

    events = run(go())
    finished = events[-1].finished
    assert finished.reason == pb.FINISH_REASON_STOP and finished.full_text == "Halt." and finished.emotion == "bored"
    assert [t.npc_line for t in sessions.history("s")] == ["Halt."] and not dialogue.busy


async def _events(stream) -> list:
    return [event async for event in stream]


def test_garbage_adapter_keeps_the_last_good_version(tmp_path):
    """The adapter file is overwritten after it was validated but before its first reply: the
    engine must serve the validated weights, not read the garbage."""
    root = copy_characters(tmp_path / "characters", ("blacksmith", "oracle"))
    weights = root / "oracle" / "adapter" / "adapter_model.safetensors"
    good = weights.read_bytes()
    server = SidecarProcess(root)

    async def status(client):
        return {c.id: c for c in await client.list_characters()}["oracle"]

    async def go():
        async with NpcClient(server.address) as client:
            before = await status(client)
            weights.write_bytes(os.urandom(len(good)))
            failed = await _wait_for(lambda: _failed(client))
            assert failed.serving and failed.version == before.version and "adapter_model" in failed.error
            started, text, finished = await client.say("oracle", "Who are you?",
                                                       options=pb.GenerationOptions(max_tokens=8, temperature=0))
            assert finished.reason in DONE and text and started.character_version == before.version
            weights.write_bytes(good[: len(good) // 2])  # then a half-copied file: still the last good one
            await asyncio.sleep(1.2)
            _, text2, _ = await client.say("oracle", "Who are you?",
                                           options=pb.GenerationOptions(max_tokens=8, temperature=0))
            assert text2 == text
            weights.write_bytes(good)
            ready = await _wait_for(lambda: _ready(client))
            assert ready.version == before.version and not ready.error

    async def _failed(client):
        s = await status(client)
        return s if s.status == pb.CHARACTER_STATUS_FAILED else None

    async def _ready(client):
        s = await status(client)
        return s if s.status == pb.CHARACTER_STATUS_READY else None

    try:
        run(go())
    finally:
        server.stop()


def test_limits_are_configurable_and_reported(tmp_path):
    root = copy_characters(tmp_path / "characters", ("oracle",))
    write_character(root, "guard", "You are a guard. You talk a lot.",
                    generation="{max_tokens: 3, max_tokens_limit: 4}")
    server = SidecarProcess(root, "--limit", "max_line_chars=10", "--limit", "max_tokens=40")

    async def go():
        async with NpcClient(server.address) as client:
            info = await client.server_info()
            expected = RequestLimits(max_line_chars=10, max_tokens=40)
            assert info.limits.max_line_chars == 10 and info.limits.max_tokens == info.max_tokens_limit == 40
            assert info.limits.max_world_entries == expected.max_world_entries
            for line, options, field in (("x" * 11, None, "player_line"),
                                         ("hi", pb.GenerationOptions(max_tokens=41), "options.max_tokens")):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await client.say("oracle", line, options=options)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)
            # The character's own cap wins over a request that asks for more.
            _, _, finished = await client.say("guard", "Story?", options=pb.GenerationOptions(
                max_tokens=40, temperature=0, stop=["NEVER"]))
            assert finished.usage.completion_tokens <= 4

    try:
        run(go())
    finally:
        server.stop()


def test_bad_limit_flags_name_the_flag(tmp_path):
    from subprocess import run as sub_run

    from tests.sidecar_process import REPO

    npc = REPO / ".venv" / "bin" / "npc"
    for flag, words in (("max_lines=3", "NAME one of"), ("max_tokens=-1", "--limit max_tokens"),
                        ("max_tokens=4000", "context length")):
        r = sub_run([str(npc), "serve", "--characters", str(REPO / "characters"), "--listen", "127.0.0.1:0",
                     "--limit", flag], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_host_port_flags_are_parsed_in_one_place():
    from sidecar.config import ServerConfig, parse_listen
    from sidecar.errors import UserError

    assert parse_listen("--listen", "[::1]:50051") == ("[::1]", 50051) and parse_listen("--x", "h:0") == ("h", 0)
    for bad in ("50051", ":1", "h:", "h:65536", "h:-1", "h:\u00b2", "h:\uff15"):  # (² and ５ are str.isdigit())
        with pytest.raises(UserError, match="--openai-listen: expected HOST:PORT"):
            ServerConfig(openai_listen=bad)


def test_loopback_by_default_and_a_warning_beyond_it(tmp_path):
    assert is_loopback("127.0.0.1:50051") and is_loopback("localhost:1") and is_loopback("[::1]:5")
    assert not is_loopback("0.0.0.0:50051") and not is_loopback("[::]:1") and not is_loopback("game-pc:1")
    root = copy_characters(tmp_path / "characters", ("oracle",))
    token = "tok-9f8e7d6c5b4a"
    open_server = SidecarProcess(root, "--listen", "0.0.0.0:0")
    open_server.stop()
    assert any("without --auth-token" in line for line in open_server.log)

    guarded = SidecarProcess(root, "--listen", "0.0.0.0:0", "--auth-token", token)
    try:
        async def go():
            port = guarded.address.rpartition(":")[2]
            for sent in (token, "wrong-" + token, None):
                async with NpcClient(f"127.0.0.1:{port}", auth_token=sent) as client:
                    call = client.say("oracle", "Hello", options=pb.GenerationOptions(max_tokens=2))
                    if sent == token:
                        await call
                        continue
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

        run(go())
    finally:
        guarded.stop()
    log = "".join(guarded.log)
    assert "without --auth-token" not in log
    assert token not in log  # neither the server's token nor what a client sent
    assert '"event": "reply"' in log or '"event":"reply"' in log  # the accepted call was logged
