"""SessionStore: history, LRU eviction, reset, export/import round trip, bad imports."""

from __future__ import annotations

import json

import pytest

from sidecar.dialogue.actions import Action
from sidecar.dialogue.sessions import SessionError, SessionExists, SessionStore, Turn, UnknownSession
from sidecar.errors import UserError


def turn(i: int, character: str = "smith") -> Turn:
    return Turn(character, f"line {i}", f"reply {i}", "Ayla", "v1")


def test_emotion_and_actions_survive_export_and_import():
    store = SessionStore()
    sold = Action("sell_item", (("item", "iron sword"), ("price", 40), ("credit", False)))
    store.append_turn("s", Turn("smith", "I'll take it.", "Forty gold.", emotion="gruff", actions=(sold,)))
    store.append_turn("s", turn(1))
    data = json.loads(json.dumps(store.export("s")))  # what a save file holds
    assert data["turns"][0]["actions"] == [{"name": "sell_item",
                                            "arguments": {"item": "iron sword", "price": 40, "credit": False}}]
    other = SessionStore()
    other.import_(data)
    assert other.history("s") == store.history("s")
    assert other.history("s")[0].actions == (sold,) and other.history("s")[0].emotion == "gruff"


@pytest.mark.parametrize("actions, words", [
    ("sell", "actions: must be a list"),
    ([{"name": "sell", "arguments": {"x": [1]}}], "actions[0].arguments"),
    ([{"arguments": {}}], "actions[0]"),
    ([{"name": "sell", "price": 3}], "actions[0]"),
    ([{"name": "a"}] * 17, "at most 16"),
])
def test_bad_imported_actions_name_the_field(actions, words):
    data = {"format": 1, "session_id": "s", "turns": [{"character_id": "smith", "player_line": "a",
                                                        "npc_line": "b", "actions": actions}]}
    with pytest.raises(SessionError, match="session.turns\\[0\\].actions") as info:
        SessionStore().import_(data)
    assert words in str(info.value)


def test_history_in_order():
    store = SessionStore()
    assert store.history("s") == () and "s" not in store  # reading does not create a session
    for i in range(3):
        store.append_turn("s", turn(i))
    assert [t.player_line for t in store.history("s")] == ["line 0", "line 1", "line 2"]


def test_history_is_a_snapshot():
    store = SessionStore()
    store.append_turn("s", turn(0))
    seen = store.history("s")  # a reply in flight keeps what it started with
    store.append_turn("s", turn(1))
    assert len(seen) == 1 and len(store.history("s")) == 2


def test_stored_turns_are_bounded():
    store = SessionStore(max_turns=2)
    for i in range(5):
        store.append_turn("s", turn(i))
    assert [t.player_line for t in store.history("s")] == ["line 3", "line 4"]


def test_least_recently_used_session_leaves():
    store = SessionStore(max_sessions=2)
    store.append_turn("a", turn(0))
    store.append_turn("b", turn(0))
    store.history("a")  # a read is a use: "b" is now the oldest
    store.append_turn("c", turn(0))
    assert "a" in store and "c" in store and "b" not in store and len(store) == 2


def test_reset():
    store = SessionStore()
    store.append_turn("s", turn(0))
    store.append_turn("s", turn(1))
    assert store.reset("s") == 2
    assert store.history("s") == () and "s" not in store
    with pytest.raises(UnknownSession, match="'s'"):
        store.reset("s")
    assert store.reset("s", missing_ok=True) == 0


def test_reset_one_character():
    store = SessionStore()
    for i, who in enumerate(["smith", "oracle", "smith"]):
        store.append_turn("s", turn(i, who))
    assert store.reset("s", "smith") == 2
    assert [t.character_id for t in store.history("s")] == ["oracle"]
    assert store.reset("s", "nobody") == 0


def test_unknown_session_export():
    with pytest.raises(UnknownSession) as info:
        SessionStore().export("nope")
    assert isinstance(info.value, UserError) and str(info.value).startswith("session_id: ")


def test_bad_session_id():
    with pytest.raises(SessionError, match="session_id: must be a non-empty string"):
        SessionStore().append_turn("", turn(0))
    with pytest.raises(SessionError, match="session_id: is 300 characters long"):
        SessionStore().export("x" * 300)


def test_export_import_round_trip():
    store = SessionStore()
    store.append_turn("s", turn(0))
    store.append_turn("s", Turn("oracle", "<|im_end|> ünïcødé 🐉", ""))
    data = json.loads(json.dumps(store.export("s")))  # what a save file gives back
    assert data["format"] == 1 and data["session_id"] == "s" and len(data["turns"]) == 2
    assert data["updated_unix_ms"] > 0

    other = SessionStore()
    result = other.import_(data)
    assert (result.session_id, result.turns, result.replaced) == ("s", 2, False)
    assert other.history("s") == store.history("s")
    assert other.export("s") == data
    assert other.import_(data, session_id="renamed").session_id == "renamed"
    assert other.history("renamed") == store.history("s")


def test_export_one_character():
    store = SessionStore()
    store.append_turn("s", turn(0, "smith"))
    store.append_turn("s", turn(1, "oracle"))
    assert [t["character_id"] for t in store.export("s", "oracle")["turns"]] == ["oracle"]
    assert store.export("s", "nobody")["turns"] == []  # not an error: just no turns


def test_import_replaces_or_refuses():
    store = SessionStore()
    for i in range(3):
        store.append_turn("s", turn(i))
    with pytest.raises(SessionExists, match="state.session_id: session 's' exists"):
        store.import_({"format": 1, "session_id": "s", "turns": []}, overwrite=False, where="state")
    assert len(store.history("s")) == 3
    result = store.import_({"format": 1, "session_id": "s", "turns": []})
    assert result.replaced and result.turns == 0 and store.history("s") == () and "s" in store


_DELETE = object()


def good_export() -> dict:
    return {"format": 1, "session_id": "s", "updated_unix_ms": 5,
            "turns": [{"character_id": "smith", "player_line": "hi", "npc_line": "yo", "player_name": "Ayla",
                       "character_version": "v1"}]}


def _with(path: list, value) -> dict:
    data = good_export()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


@pytest.mark.parametrize("data, words", [
    ([], "session: must be an object"),
    (_with(["format"], 2), "session.format: must be 1, got 2"),
    (_with(["format"], True), "session.format: must be 1"),
    (_with(["format"], _DELETE), "session.format"),
    (_with(["session_id"], ""), "session.session_id: must be a non-empty string"),
    (_with(["session_id"], 5), "session.session_id"),
    (_with(["updated_unix_ms"], -1), "session.updated_unix_ms: must be a whole number >= 0"),
    (_with(["extra"], 1), "session.extra: unknown field"),
    (_with(["turns"], {}), "session.turns: must be a list"),
    (_with(["turns", 0], "hi"), "session.turns[0]: must be an object"),
    (_with(["turns", 0, "npc_line"], 3), "session.turns[0].npc_line: must be a string, got 3"),
    (_with(["turns", 0, "player_line"], _DELETE), "session.turns[0].player_line: must be a string, got None"),
    (_with(["turns", 0, "character_id"], ""), "session.turns[0].character_id: must match"),
    (_with(["turns", 0, "character_id"], "../x"), "session.turns[0].character_id: must match"),
    (_with(["turns", 0, "character_version"], 1), "session.turns[0].character_version"),
    (_with(["turns", 0, "player_name"], "n" * 65), "session.turns[0].player_name: is 65 characters long"),
    (_with(["turns", 0, "mood"], "sad"), "session.turns[0].mood: unknown field"),
    (_with(["turns", 0, "npc_line"], "x" * 30_000), "session.turns[0].npc_line: is 30000 characters long"),
])
def test_bad_import_names_the_field(data, words):
    store = SessionStore()
    store.append_turn("s", turn(0))
    before = store.history("s")
    with pytest.raises(SessionError) as info:
        store.import_(data)
    assert words in str(info.value), str(info.value)
    assert store.history("s") == before  # a bad save changes nothing


def test_import_too_many_turns():
    data = good_export()
    data["turns"] = data["turns"] * 3
    with pytest.raises(SessionError, match=r"state.turns: has 3 turns; the limit is 2"):
        SessionStore(max_turns=2).import_(data, where="state")


def test_the_caller_names_the_format_field():
    """The proto calls it format_version, the export dict `format`: the caller says which, whatever `where` is."""
    from sidecar.dialogue.sessions import parse_export

    bad = _with(["format"], 2)
    with pytest.raises(SessionError, match=r"^save\.format_version: must be 1, got 2"):
        parse_export(bad, 5, "save", format_field="format_version")
    with pytest.raises(SessionError, match=r"^state\.format: must be 1, got 2"):
        SessionStore().import_(bad, where="state", format_field="format")


def test_optional_turn_fields():
    data = _with(["turns", 0, "character_version"], _DELETE)
    del data["turns"][0]["player_name"]
    del data["updated_unix_ms"]
    store = SessionStore()
    store.import_(data)
    assert store.history("s")[0] == Turn("smith", "hi", "yo", "", "")
