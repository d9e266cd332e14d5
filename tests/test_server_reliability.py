"""Faults and defaults over a real socket: clients hanging up mid-reply, a character.yaml edited and an
adapter overwritten with garbage under load, SIGTERM under load with a session store, configurable
limits, and what a server bound beyond loopback says. (`npc bench --scenario faults` measures the same
faults at scale; the checks are here.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass

import grpc
import pytest
import yaml

from sidecar.client import NpcClient
from sidecar.config import RequestLimits, ServerConfig
from sidecar.dialogue.characters import load_character
from sidecar.pb.npc.v1 import dialogue_pb2 as pb
from sidecar.server.app import is_loopback
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


GRACE_S = 1.0  # short enough that some replies in flight finish and some are cut
# Wall-clock bounds for a loaded 2-core machine, far below what a missing cut would take: a reply in
# flight at SIGTERM asked for 48 tokens, several seconds of decoding under this load.
READ_SLACK_S = 2.0  # a reply finished within the grace still has to reach the client
EXIT_SLACK_S = 8.0  # after the grace: the cut, the session store's last write, interpreter teardown


@dataclass
class _Reply:
    character: str
    line: str
    session: str
    outcome: str  # the finish reason (STOP, LENGTH, CANCELLED) or the status code that ended the call
    version: str  # Started.character_version
    text: str
    ended: float  # time.monotonic()

    @property
    def done(self) -> bool:
        """Read to its end: the only kind of reply a session keeps."""
        return self.outcome in ("STOP", "LENGTH")


class _Players:
    """`n` players talking back to back, player i to characters[i % len] in its own session "p{i}", until
    `stop` is set or a reply of theirs does not finish (which every test here counts as a failure)."""

    def __init__(self, client: NpcClient, characters: tuple[str, ...], n: int, max_tokens: int = 8):
        self.stop = asyncio.Event()
        self.replies: list[_Reply] = []
        options = pb.GenerationOptions(max_tokens=max_tokens, temperature=0.8)
        self._tasks = [asyncio.create_task(self._play(client, characters[i % len(characters)], f"p{i}", options))
                       for i in range(n)]

    async def _play(self, client: NpcClient, cid: str, session: str, options: pb.GenerationOptions) -> None:
        turn = 0
        while not self.stop.is_set():
            line = f"Player {session} asks question {turn}: what news?"
            try:
                started, _, finished = await client.say(cid, line, session_id=session, options=options)
                outcome = pb.FinishReason.Name(finished.reason).removeprefix("FINISH_REASON_")
                version = started.character_version if started else ""  # a queued reply cut by SIGTERM has none
                reply = _Reply(cid, line, session, outcome, version, finished.full_text, time.monotonic())
            except grpc.aio.AioRpcError as e:
                reply = _Reply(cid, line, session, e.code().name, "", "", time.monotonic())
            self.replies.append(reply)
            if not reply.done:
                return
            turn += 1

    async def finish(self) -> list[_Reply]:
        """Lets every player read the reply in flight to its end, then stops them."""
        self.stop.set()
        await asyncio.gather(*self._tasks)
        return self.replies


def _not_done(replies: list[_Reply]) -> list[tuple[str, str]]:
    return [(r.character, r.outcome) for r in replies if not r.done]


def test_sigterm_under_load_keeps_every_finished_turn(tmp_path):
    """Clients talk in their own sessions; SIGTERM arrives mid-reply. Each reply in flight finishes within
    the grace period or ends CANCELLED / UNAVAILABLE, the process exits 0 soon after the grace, and every
    turn whose Finished a client received is in the session store and comes back after a restart, in order."""
    root = copy_characters(tmp_path / "characters", ("blacksmith", "oracle"))
    store = tmp_path / "sessions.jsonl"
    server = SidecarProcess(root, "--session-store", str(store), "--grace", f"{GRACE_S:g}", "--max-batch", "4")

    async def go():
        async with NpcClient(server.address) as client:
            players = _Players(client, ("blacksmith", "oracle"), 6, max_tokens=48)

            async def loaded():
                return sum(r.done for r in players.replies) >= 8

            await _wait_for(loaded, 180)
            await asyncio.sleep(0.3)  # replies of every player in flight
            players.stop.set()  # nobody starts a new reply: the ones in flight are the test
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.proc.wait, GRACE_S + EXIT_SLACK_S)
            exited = time.monotonic() - signalled
            return signalled, code, exited, await players.finish()

    try:
        signalled, code, exited, replies = run(go())
    finally:
        server.stop()
    assert code == 0 and exited <= GRACE_S + EXIT_SLACK_S, "".join(server.log[-20:])
    before, in_flight = [r for r in replies if r.ended <= signalled], [r for r in replies if r.ended > signalled]
    assert not _not_done(before) and in_flight
    assert {r.outcome for r in in_flight if not r.done} <= {"UNAVAILABLE", "CANCELLED"}, _not_done(in_flight)
    late = [round(r.ended - signalled, 2) for r in in_flight if r.done and r.ended - signalled > GRACE_S + READ_SLACK_S]
    assert not late, f"replies finished {late} s after SIGTERM, past the {GRACE_S:g} s grace"

    received: dict[str, list[tuple[str, str]]] = {}
    for r in sorted((r for r in replies if r.done), key=lambda r: r.ended):
        received.setdefault(r.session, []).append((r.line, r.text))
    restarted = SidecarProcess(root, "--session-store", str(store))
    try:
        async def exported():
            async with NpcClient(restarted.address) as client:
                return {sid: [(t.player_line, t.npc_line) for t in (await client.export_session(sid)).turns]
                        for sid in received}

        assert run(exported()) == received
    finally:
        restarted.stop()


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    """One server for the tests that only talk to it or edit a character and put it back."""
    server = SidecarProcess(copy_characters(tmp_path_factory.mktemp("characters"), ("blacksmith", "oracle")),
                            "--max-batch", "4")
    yield server
    assert server.stop() == 0, "".join(server.log[-20:])
    assert not server.log_records("error", "critical"), server.log_records("error", "critical")


def test_clients_hanging_up_mid_reply_leave_the_server_idle(busy_server):
    """40 players, 20 at a time (more than --max-batch: some wait), hang up mid-reply: after 0, 1 or 2
    deltas (0: right after Started), or at a random moment that may find them still queued. Each asked
    for 400 tokens, so a generation the hang-up did not stop would keep the server busy for minutes:
    it must be idle (nothing running or waiting) within seconds, and still answer."""
    rng = random.Random(0)

    async def hang_up(client: NpcClient, n: int) -> str:
        call = client.talk(("blacksmith", "oracle")[n % 2], "Tell me a long story about the sea.",
                           session_id=f"drop-{n}", options=pb.GenerationOptions(max_tokens=400))
        after, deltas = n % 4, 0  # after == 3: at a random moment instead
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(rng.uniform(0.0, 0.5) if after == 3 else None):
                async for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "finished":
                        return "finished first"
                    deltas += kind == "delta"
                    if after < 3 and deltas >= after:
                        break
        call.cancel()
        return "hung up"

    async def go():
        async with NpcClient(busy_server.address) as client:
            outcomes = []
            for first in (0, 20):
                outcomes += await asyncio.gather(*[hang_up(client, n) for n in range(first, first + 20)])

            async def idle():
                info = await client.server_info()
                return info.active_sequences == 0 and info.waiting_requests == 0

            await _wait_for(idle, 10)
            _, text, finished = await client.say("oracle", "Are you still there?",
                                                 options=pb.GenerationOptions(max_tokens=4))
            assert finished.reason in DONE and text
            return outcomes

    outcomes = run(go())
    assert len(outcomes) == 40 and outcomes.count("hung up") >= 30, outcomes


def test_character_yaml_edited_under_load(busy_server):
    """blacksmith's character.yaml is rewritten, atomically and in place (as editors save), while players
    talk to it and to oracle: no reply fails, each new version serves once the server has read it, and
    every reply names a version that was written (a half-written file never serves)."""
    folder = busy_server.characters / "blacksmith"
    path = folder / "character.yaml"
    original = path.read_bytes()
    data = yaml.safe_load(original)

    def write(text: bytes, atomic: bool) -> None:
        if atomic:
            tmp = path.with_name(".character.yaml.tmp")
            tmp.write_bytes(text)
            os.replace(tmp, path)
        else:
            path.write_bytes(text)  # truncated, then written: the server may read it half-way

    async def go():
        async with NpcClient(busy_server.address) as client:
            listed = {c.id: c.version for c in await client.list_characters()}

            async def serving(version: str):
                return {c.id: c for c in await client.list_characters()}["blacksmith"].version == version

            async def replied(version: str):
                return any(r.version == version for r in players.replies)

            written = [listed["blacksmith"]]
            players = _Players(client, ("blacksmith", "oracle"), 4)
            for n, atomic in enumerate((True, False), start=1):
                persona = data["persona"].rstrip() + f"\nToday is day {n} of the harvest festival."
                write(yaml.safe_dump({**data, "persona": persona}, sort_keys=False).encode(), atomic)
                written.append(load_character(folder).version)
                await _wait_for(lambda v=written[-1]: serving(v))
                await _wait_for(lambda v=written[-1]: replied(v), 60)
            write(original, atomic=True)
            await _wait_for(lambda: serving(written[0]))
            return listed, written, await players.finish()

    listed, written, replies = run(go())
    assert not _not_done(replies)
    assert {r.version for r in replies if r.character == "blacksmith"} <= set(written)
    assert {r.version for r in replies if r.character == "oracle"} == {listed["oracle"]}


async def _events(stream) -> list:
    return [event async for event in stream]


def test_garbage_adapter_under_load_keeps_the_last_good_version(tmp_path):
    """The adapter file is overwritten with random bytes after it was validated but before its first
    reply, then with a truncated copy, then restored, while players talk to it and to another
    character: the engine serves the validated weights throughout (no failed reply, every reply from
    the last good version), and ListCharacters says FAILED but serving until the file is good again."""
    root = copy_characters(tmp_path / "characters", ("blacksmith", "oracle"))
    weights = root / "oracle" / "adapter" / "adapter_model.safetensors"
    good = weights.read_bytes()
    server = SidecarProcess(root, "--max-batch", "4")

    async def status(client, error_not: str | None = None):
        s = {c.id: c for c in await client.list_characters()}["oracle"]
        return s if s.status == pb.CHARACTER_STATUS_FAILED and s.error != error_not else None

    async def go():
        async with NpcClient(server.address) as client:
            before = {c.id: c for c in await client.list_characters()}["oracle"]
            weights.write_bytes(os.urandom(len(good)))  # in place
            failed = await _wait_for(lambda: status(client))
            assert failed.serving and failed.version == before.version and "adapter_model" in failed.error
            players = _Players(client, ("oracle", "blacksmith"), 4)
            started, text, finished = await client.say("oracle", "Who are you?",
                                                       options=pb.GenerationOptions(max_tokens=8, temperature=0))
            assert finished.reason in DONE and text and started.character_version == before.version
            half = weights.with_name(".half")  # then a half-copied file, renamed over it: still the last good one
            half.write_bytes(good[: len(good) // 2])
            os.replace(half, weights)
            truncated = await _wait_for(lambda: status(client, error_not=failed.error))
            assert truncated.serving and truncated.version == before.version
            _, text2, _ = await client.say("oracle", "Who are you?",
                                           options=pb.GenerationOptions(max_tokens=8, temperature=0))
            assert text2 == text
            weights.write_bytes(good)

            async def ready():
                s = {c.id: c for c in await client.list_characters()}["oracle"]
                return s if s.status == pb.CHARACTER_STATUS_READY else None

            restored = await _wait_for(ready)
            assert restored.version == before.version and not restored.error
            replies = await players.finish()
            assert not _not_done(replies)
            oracle = [r for r in replies if r.character == "oracle"]
            assert oracle and {r.version for r in oracle} == {before.version}

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
    from sidecar.config import parse_listen
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
