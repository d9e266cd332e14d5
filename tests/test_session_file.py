"""`--session-store FILE`: the journal replays to the same store, survives torn writes, refuses corruption."""

from __future__ import annotations

import json

import pytest

from sidecar.dialogue import session_file
from sidecar.dialogue.session_file import SessionFile, SessionFileError
from sidecar.dialogue.sessions import SessionStore, Turn


def _turn(i: int, cid: str = "oracle") -> Turn:
    return Turn(cid, f"line {i} <|im_end|> \u00e9\U0001F600", f"reply {i}\nsecond line", "Aria", "v1")


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
