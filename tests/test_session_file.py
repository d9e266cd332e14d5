"""`--session-store FILE`: the journal replays to the same store, survives torn writes, refuses corruption."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time

import pytest

from sidecar.dialogue import session_file
from sidecar.dialogue.actions import Action
from sidecar.dialogue.session_file import SessionFile, SessionFileError
from sidecar.dialogue.sessions import SessionStore, Turn, turn_dict


def _turn(i: int, cid: str = "oracle") -> Turn:
    actions = (Action("point_to", (("place", f"cave {i}"),)), Action("bless", (("n", i), ("loud", i % 2 == 0))))
    return Turn(cid, f"line {i} <|im_end|> \u00e9\U0001F600", f"reply {i}\nsecond line", "Aria", "v1",
                emotion="calm" if i % 2 else "", actions=actions[: i % 3])


def _state(store: SessionStore) -> list[dict]:
    return store.records()


def _reopen(path, **kwargs) -> SessionStore:
    """What a new server would load from a copy of `path` taken now (as after a crash)."""
    copy = path.with_name("copy-" + path.name)
    copy.write_bytes(path.read_bytes())
    store = SessionStore(**kwargs)
    f = SessionFile(copy)
    f.open(store)
    f.close(store)
    return store


def test_every_change_is_on_disk_before_close(tmp_path):
    path = tmp_path / "sessions.jsonl"
    store, f = SessionStore(), SessionFile(path)
    assert f.open(store) == 0
    for i in range(5):
        store.append_turn("p1", _turn(i))
        store.append_turn("p2", _turn(i, "blacksmith"))
    store.reset("p1", "oracle")
    store.append_turn("p1", _turn(9, "elara"))
    store.reset("p2")
    store.import_({"format": 1, "session_id": "p3", "turns": [
        {"character_id": "oracle", "player_line": "a", "npc_line": "b"}]})
    expected = _state(store)
    assert _state(_reopen(path)) == expected  # not closed, as after a crash: the journal alone rebuilds it
    f.close(store)
    assert _state(_reopen(path)) == expected
    assert len(path.read_text().splitlines()) == 1 + 2  # compacted: header + one line per session


def test_bounds_and_eviction_replay_the_same(tmp_path):
    path = tmp_path / "s.jsonl"
    store, f = SessionStore(max_sessions=2, max_turns=3), SessionFile(path)
    f.open(store)
    for i in range(10):
        store.append_turn(f"p{i % 3}", _turn(i))
    expected = _state(store)
    assert _state(_reopen(path, max_sessions=2, max_turns=3)) == expected
    f.close(store)


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "s.jsonl"
    store, f = SessionStore(), SessionFile(path)
    f.open(store)
    store.append_turn("p", _turn(1))
    store.append_turn("p", _turn(2))
    with open(path, "a") as raw:  # a crash in the middle of writing the third turn
        raw.write('{"op": "turn", "session_id": "p", "updated_un')
    restored = _reopen(path)
    assert [t.player_line for t in restored.history("p")] == [_turn(1).player_line, _turn(2).player_line]


@pytest.mark.parametrize("bad_line,words", [
    ("not json", "line 3"),
    ('{"op": "explode"}', "record.op"),
    ('{"op": "turn", "session_id": "p", "updated_unix_ms": 1, "turn": {"character_id": "../x", '
     '"player_line": "a", "npc_line": "b"}}', "record.turn.character_id"),
    ('{"op": "put", "session": {"format": 9, "session_id": "p"}}', "record.session.format"),
])
def test_corrupt_line_in_the_middle_is_refused_and_kept(tmp_path, bad_line, words):
    path = tmp_path / "s.jsonl"
    store, f = SessionStore(), SessionFile(path)
    f.open(store)
    store.append_turn("p", _turn(1))
    f.close(store)
    lines = path.read_text().splitlines()
    lines.insert(2, bad_line)
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    with pytest.raises(SessionFileError) as e:
        SessionFile(path).open(SessionStore())
    assert str(path) in str(e.value) and ":3:" in str(e.value) and words.split()[-1] in str(e.value)
    assert path.read_bytes() == before  # nothing lost: the user can fix the line


def test_not_a_session_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("shopping list\n")
    with pytest.raises(SessionFileError, match="not a session store file"):
        SessionFile(path).open(SessionStore())


def test_one_server_per_file(tmp_path):
    path = tmp_path / "s.jsonl"
    first, store = SessionFile(path), SessionStore()
    first.open(store)
    with pytest.raises(SessionFileError, match="in use by another npc serve"):
        SessionFile(path).open(SessionStore())
    first.close(store)
    SessionFile(path).open(SessionStore())  # free again


def test_journal_is_compacted_when_it_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(session_file, "MIN_RECORDS_BEFORE_COMPACTING", 20)
    path = tmp_path / "s.jsonl"
    store, f = SessionStore(max_turns=2), SessionFile(path)
    f.open(store)
    for i in range(100):
        store.append_turn("p", _turn(i))
    assert len(path.read_text().splitlines()) < 25
    f.close(store)
    assert _state(_reopen(path, max_turns=2)) == _state(store)


def test_write_failure_keeps_serving(tmp_path):
    path = tmp_path / "s.jsonl"
    store, f = SessionStore(), SessionFile(path)
    f.open(store)

    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    f._file = Full()
    store.append_turn("p", _turn(1))  # no exception: the reply was already delivered
    assert len(store.history("p")) == 1
    f._file = open(path, "a")  # noqa: SIM115
    f.close(store)
    assert json.loads(path.read_text().splitlines()[1])["session"]["session_id"] == "p"  # compaction wrote it


def test_a_reset_that_triggers_compaction_is_kept(tmp_path, monkeypatch):
    """The compaction's snapshot must already hold the change whose record triggered it."""
    monkeypatch.setattr(session_file, "MIN_RECORDS_BEFORE_COMPACTING", 1)
    path = tmp_path / "s.jsonl"
    store, f = SessionStore(), SessionFile(path)
    f.open(store)
    for i in range(4):
        store.append_turn("p1", _turn(i))
    store.reset("p1")  # the 5th record: past 4 x 1 session, compacts
    assert "p1" not in _reopen(path)
    f.close(store)


def _swapped(path, inode: int) -> bool:
    return os.stat(path).st_ino != inode  # the compacted file was renamed over the journal


def test_records_during_a_background_compaction_follow_it_in_order(tmp_path, monkeypatch):
    """Compaction writes its snapshot on a worker thread; what the loop journals meanwhile must be in the new
    file too, after the snapshot and in order (and in the old one until the swap)."""
    monkeypatch.setattr(session_file, "MIN_RECORDS_BEFORE_COMPACTING", 5)
    started, release = threading.Event(), threading.Event()
    write_snapshot = session_file._write_snapshot

    def held(*args):
        if threading.current_thread() is not threading.main_thread():  # (_reopen compacts on this thread)
            started.set()
            assert release.wait(10)
        return write_snapshot(*args)

    monkeypatch.setattr(session_file, "_write_snapshot", held)
    path = tmp_path / "s.jsonl"
    store, f = SessionStore(max_sessions=3), SessionFile(path)
    f.open(store)
    inode = os.stat(path).st_ino

    async def go():
        for i in range(9):  # the 9th record (past 4 x 2 sessions) starts a compaction
            store.append_turn(f"p{i % 2}", _turn(i))
        while not started.is_set():
            await asyncio.sleep(0.001)
        store.append_turn("p0", _turn(10))  # all of these while the snapshot is being written
        store.reset("p1", "oracle")
        store.import_({"format": 1, "session_id": "p2", "turns": [turn_dict(_turn(11, "elara"))]})
        store.append_turn("p3", _turn(12))  # evicts the least recent session (p1)
        assert not _swapped(path, inode)
        expected = _state(store)
        assert _state(_reopen(path, max_sessions=3)) == expected  # the old journal has everything so far
        release.set()
        while not _swapped(path, inode):
            await asyncio.sleep(0.001)
        assert _state(_reopen(path, max_sessions=3)) == expected
        ops = [json.loads(line)["op"] for line in path.read_text().splitlines()[1:]]
        assert ops == ["put", "put", "turn", "reset", "put", "turn", "reset"]  # the snapshot, then what followed
        store.append_turn("p0", _turn(13))  # journaled into the new file

    asyncio.run(asyncio.wait_for(go(), 20))
    assert _state(_reopen(path, max_sessions=3)) == _state(store)
    f.close(store)
    assert _state(_reopen(path, max_sessions=3)) == _state(store)


def test_compaction_leaves_the_event_loop_free(tmp_path, monkeypatch):
    """A large compaction (~35 MB here; ~100 MB at the default caps) must not stall every NPC's stream."""
    path = tmp_path / "s.jsonl"
    store, f = SessionStore(max_sessions=1000, max_turns=40), SessionFile(path)
    f.open(store)
    hook, store.on_change = store.on_change, None  # filled unjournaled: only the snapshot's size matters here
    line = "x" * 400
    for i in range(40_000):
        store.append_turn(f"s{i % 1000}", Turn("oracle", line, line, "Aria", "v1"), 1)
    store.on_change = hook
    monkeypatch.setattr(session_file, "MIN_RECORDS_BEFORE_COMPACTING", 100)
    # CPU time, not wall time (a loaded machine stretches that, not this): the loop's thread's own CPU time
    # between two heartbeats, against the CPU time of writing the snapshot, measured on whichever thread does it.
    writer: dict[str, float | threading.Thread] = {}
    write_snapshot = session_file._write_snapshot

    def measured(*args):
        started = time.thread_time()
        write_snapshot(*args)
        writer.update(thread=threading.current_thread(), cpu=time.thread_time() - started)

    monkeypatch.setattr(session_file, "_write_snapshot", measured)
    inode = os.stat(path).st_ino
    gaps: list[float] = []

    async def go():
        async def heartbeat():
            last = time.thread_time()
            while True:
                await asyncio.sleep(0.001)
                now = time.thread_time()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.01)
        i = 0
        while not _swapped(path, inode):  # NPCs keep finishing turns: the 4001st record starts a compaction
            store.append_turn(f"s{i % 1000}", _turn(i))
            i += 1
            if i % 20 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.02)  # the heartbeat notes the last gap
        beat.cancel()

    gc.disable()  # a full collection (~0.1 s under pytest) would be charged to whichever thread triggers it
    try:
        asyncio.run(asyncio.wait_for(go(), 120))  # a hang guard, not the measure
    finally:
        gc.enable()
    # On the loop, the snapshot's writing would fall between two heartbeats whole.
    assert writer["thread"] is not threading.current_thread(), "the snapshot was written on the event loop's thread"
    stall, write = max(gaps), writer["cpu"]
    assert stall < write / 4, f"the loop ran {stall:.3f} CPU-s between heartbeats; the snapshot took {write:.3f}"
    assert _state(_reopen(path, max_sessions=1000, max_turns=40)) == _state(store)  # with what came meanwhile
    f.close(store)
