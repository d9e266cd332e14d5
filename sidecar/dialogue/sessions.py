"""Conversation history per session, bounded, exportable to a game's save file.

A session holds the player's turns with every character under that id, and the lines of the scenes
played in it (a scene line is a Turn with a `scene_id` and no player line; the scene's situation and
cast are kept once, as a SceneRecord). Each character's prompt uses only its own turns with the
player (prompt.recent_turns); scene lines come back as memories (retrieval.py). Only finished
replies enter the history (the server calls append_turn after Finished, never after a cancel).
The store is used from the server's one asyncio loop, so it takes no locks.

The export dict mirrors proto npc.v1 SessionState / Turn field names, with `format` for
`format_version`, so the servicer converts field by field and error paths read the same.

Every change is also described as a small JSON-able record passed to `on_change` (session_file.py
appends them to `--session-store FILE`); `apply()` replays such records.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from sidecar.dialogue.actions import NAME_PATTERN, Action, action_from_dict
from sidecar.dialogue.characters import ID_PATTERN
from sidecar.dialogue.relationships import VALUE_LIMIT
from sidecar.errors import UserError

log = structlog.get_logger(__name__)

EXPORT_FORMAT = 1
MAX_SESSION_ID = 256
MAX_LINE = 20_000  # characters in one stored player line or reply
MAX_PLAYER_NAME = 64


class SessionError(UserError):
    """Bad session input (an id, an imported save); the message starts with the field's path."""


class UnknownSession(UserError):
    """No session with this id (the server maps it to NOT_FOUND)."""


class SessionExists(UserError):
    """import_ without overwrite onto a session the store holds (ALREADY_EXISTS)."""


@dataclass(frozen=True)
class Turn:
    """One finished exchange: what the player said and what the NPC answered."""

    character_id: str
    player_line: str
    npc_line: str
    player_name: str = ""
    character_version: str = ""  # the version that spoke npc_line; "" = unknown
    emotion: str = ""  # the label the NPC wrote before npc_line ("" = none)
    actions: tuple[Action, ...] = ()  # what the NPC did after it
    scene_id: str = ""  # the scene this line was said in ("" = an exchange with the player)


@dataclass(frozen=True)
class SceneRecord:
    """A scene played in a session (dialogue/scene.py): what its lines were about and who was there."""

    scene_id: str
    situation: str
    character_ids: tuple[str, ...]


@dataclass(frozen=True)
class ImportResult:
    session_id: str
    turns: int
    replaced: bool  # an existing session of that id was replaced


@dataclass
class _Session:
    turns: list[Turn] = field(default_factory=list)
    updated_unix_ms: int = 0
    # (character id, relationship name) -> value; what was never set has the character's start value
    relationships: dict[tuple[str, str], int] = field(default_factory=dict)
    scenes: dict[str, SceneRecord] = field(default_factory=dict)  # by scene id, in the order they began


class SessionStore:
    def __init__(self, max_sessions: int = 1024, max_turns: int = 256):
        """`max_turns` bounds what one session stores; a prompt uses at most memory.max_turns of it."""
        if max_sessions < 1 or max_turns < 1:
            raise ValueError("max_sessions and max_turns must be at least 1")
        self.max_sessions, self.max_turns = max_sessions, max_turns
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self.on_change: Callable[[dict[str, Any]], None] | None = None  # gets a record per change

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def history(self, session_id: str) -> tuple[Turn, ...]:
        """A snapshot of the session's turns, oldest first; () for one not held. Counts as a use."""
        session = self._sessions.get(session_id)
        if session is None:
            return ()
        self._sessions.move_to_end(session_id)
        return tuple(session.turns)

    def append_turn(self, session_id: str, turn: Turn, updated_unix_ms: int | None = None) -> None:
        """Records a finished reply, creating the session if needed; the oldest turns leave past max_turns."""
        check_session_id(session_id)
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session()
        self._sessions.move_to_end(session_id)
        session.turns.append(turn)
        del session.turns[: -self.max_turns]
        session.updated_unix_ms = int(time.time() * 1000) if updated_unix_ms is None else updated_unix_ms
        self._record({"op": "turn", "session_id": session_id, "updated_unix_ms": session.updated_unix_ms,
                      "turn": turn_dict(turn)})
        self._evict()

    def add_scene(self, session_id: str, scene: SceneRecord) -> None:
        """Records that a scene began (before its first line), creating the session."""
        check_session_id(session_id)
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session()
        self._sessions.move_to_end(session_id)
        if len(session.scenes) >= MAX_SCENES:  # the oldest scene's record goes; its lines stay as plain lines
            del session.scenes[next(iter(session.scenes))]
        session.scenes[scene.scene_id] = scene
        self._record({"op": "scene", "session_id": session_id, "scene": scene_dict(scene)})
        self._evict()

    def scenes(self, session_id: str) -> dict[str, SceneRecord]:
        """The scenes of a session by id ({} for a session the store does not hold)."""
        session = self._sessions.get(session_id)
        return dict(session.scenes) if session is not None else {}

    def relationships(self, session_id: str, character_id: str) -> dict[str, int]:
        """The values set in this session for the character ({} for a session the store does not hold)."""
        session = self._sessions.get(session_id)
        if session is None:
            return {}
        return {name: value for (cid, name), value in session.relationships.items() if cid == character_id}

    def set_relationship(self, session_id: str, character_id: str, name: str, value: int,
                         updated_unix_ms: int | None = None) -> None:
        """Stores a value (checked against the character's declaration by the caller), creating the session."""
        check_session_id(session_id)
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session()
        self._sessions.move_to_end(session_id)
        session.relationships[character_id, name] = value
        session.updated_unix_ms = int(time.time() * 1000) if updated_unix_ms is None else updated_unix_ms
        self._record({"op": "relationship", "session_id": session_id, "updated_unix_ms": session.updated_unix_ms,
                      "character_id": character_id, "name": name, "value": value})
        self._evict()

    def reset(self, session_id: str, character_id: str | None = None, *, missing_ok: bool = False) -> int:
        """Forgets the session, or only `character_id`'s turns in it; returns how many turns went.

        An unknown session raises UnknownSession unless `missing_ok` (proto ResetSession is idempotent).
        """
        check_session_id(session_id)
        session = self._sessions.get(session_id)
        if session is None:
            if missing_ok:
                return 0
            raise UnknownSession(f"session_id: unknown session {_show(session_id)}")
        if not character_id:
            del self._sessions[session_id]
            forgotten = len(session.turns)
        else:
            kept = [t for t in session.turns if t.character_id != character_id]
            forgotten = len(session.turns) - len(kept)
            session.turns = kept
            session.relationships = {k: v for k, v in session.relationships.items() if k[0] != character_id}
            session.scenes = _scenes_with_lines(session.scenes, kept)
        # Recorded once done, like every change: a compaction it triggers must snapshot the store without it.
        self._record({"op": "reset", "session_id": session_id, "character_id": character_id or None})
        return forgotten

    def export(self, session_id: str, character_id: str | None = None) -> dict[str, Any]:
        """A JSON-serializable snapshot (all turns, or `character_id`'s); read back with import_."""
        check_session_id(session_id)
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"session_id: unknown session {_show(session_id)}")
        turns = [t for t in session.turns if not character_id or t.character_id == character_id]
        relationships = {k: v for k, v in session.relationships.items() if not character_id or k[0] == character_id}
        scenes = _scenes_with_lines(session.scenes, turns) if character_id else session.scenes
        return _export(session_id, session.updated_unix_ms, turns, relationships, scenes)

    def import_(self, data: Any, session_id: str | None = None, *, overwrite: bool = True,
                where: str = "session", format_field: str = "format") -> ImportResult:
        """Restores a session from an export, replacing a session of the same id (`session_id` renames it).

        Everything is checked before anything changes, so a bad save leaves the store as it was.
        `where` prefixes field paths in errors, and `format_field` is what the caller's input calls
        `format` (the servicer: "state" and the proto's "format_version").
        """
        sid, session = parse_export(data, self.max_turns, where, format_field=format_field)
        sid = session_id if session_id is not None else sid
        check_session_id(sid)
        replaced = sid in self._sessions
        if replaced and not overwrite:
            raise SessionExists(f"{where}.session_id: session {_show(sid)} exists; set overwrite to replace it")
        self._sessions[sid] = session
        self._sessions.move_to_end(sid)
        self._record({"op": "put", "session": self.export(sid)})
        self._evict()
        return ImportResult(sid, len(session.turns), replaced)

    def records(self) -> list[dict[str, Any]]:
        """The whole store as `put` records, least recently used first (what apply() rebuilds it from)."""
        return [put_record(entry) for entry in self.snapshot()]

    def snapshot(self) -> list[SessionSnapshot]:
        """The whole store, least recently used first, copied cheaply (Turns are immutable): another thread
        can turn it into records while the store changes (session_file.py compacts off the event loop)."""
        return [(sid, s.updated_unix_ms, tuple(s.turns), dict(s.relationships), dict(s.scenes))
                for sid, s in self._sessions.items()]

    def apply(self, record: Any) -> None:
        """Replays one change record (from on_change); raises SessionError for a malformed one."""
        if not isinstance(record, dict):
            raise SessionError(f"record: must be an object, got {type(record).__name__}")
        op, hook = record.get("op"), self.on_change
        self.on_change = None  # replaying is not a new change
        try:
            if op == "turn":
                _no_unknown(record, {"op", "session_id", "updated_unix_ms", "turn"}, "record")
                updated = record.get("updated_unix_ms")
                if isinstance(updated, bool) or not isinstance(updated, int) or updated < 0:
                    raise SessionError(f"record.updated_unix_ms: must be a whole number >= 0, got {_show(updated)}")
                self.append_turn(record.get("session_id"), _parse_turn(record.get("turn"), "record.turn"), updated)
            elif op == "relationship":
                _no_unknown(record, {"op", "session_id", "updated_unix_ms", "character_id", "name", "value"}, "record")
                updated = record.get("updated_unix_ms")
                if isinstance(updated, bool) or not isinstance(updated, int) or updated < 0:
                    raise SessionError(f"record.updated_unix_ms: must be a whole number >= 0, got {_show(updated)}")
                cid, name, value = _parse_relationship(record, "record")
                self.set_relationship(record.get("session_id"), cid, name, value, updated)
            elif op == "scene":
                _no_unknown(record, {"op", "session_id", "scene"}, "record")
                self.add_scene(record.get("session_id"), _parse_scene(record.get("scene"), "record.scene"))
            elif op == "reset":
                _no_unknown(record, {"op", "session_id", "character_id"}, "record")
                self.reset(record.get("session_id"), record.get("character_id"), missing_ok=True)
            elif op == "put":
                _no_unknown(record, {"op", "session"}, "record")
                self.import_(record.get("session"), where="record.session")
            else:
                raise SessionError("record.op: must be 'turn', 'relationship', 'scene', 'reset' or 'put', "
                                   f"got {_show(op)}")
        finally:
            self.on_change = hook

    def _record(self, record: dict[str, Any]) -> None:
        if self.on_change is not None:
            self.on_change(record)

    def _evict(self) -> None:
        while len(self._sessions) > self.max_sessions:
            sid, session = self._sessions.popitem(last=False)
            self._record({"op": "reset", "session_id": sid, "character_id": None})
            log.info("session evicted", session_id=sid, turns=len(session.turns), max_sessions=self.max_sessions)


# (session id, updated_unix_ms, turns, relationship values, scenes)
SessionSnapshot = tuple[str, int, tuple[Turn, ...], dict[tuple[str, str], int], dict[str, SceneRecord]]


def put_record(entry: SessionSnapshot) -> dict[str, Any]:
    """The `put` record that restores one session of a snapshot."""
    return {"op": "put", "session": _export(*entry)}


def _export(session_id: str, updated_unix_ms: int, turns: Iterable[Turn],
            relationships: dict[tuple[str, str], int], scenes: dict[str, SceneRecord]) -> dict[str, Any]:
    return {"format": EXPORT_FORMAT, "session_id": session_id, "updated_unix_ms": updated_unix_ms,
            "turns": [turn_dict(t) for t in turns],
            "relationships": [{"character_id": cid, "name": name, "value": value}
                              for (cid, name), value in sorted(relationships.items())],
            "scenes": [scene_dict(s) for s in scenes.values()]}


def scene_dict(scene: SceneRecord) -> dict[str, Any]:
    return {"scene_id": scene.scene_id, "situation": scene.situation, "character_ids": list(scene.character_ids)}


def _scenes_with_lines(scenes: dict[str, SceneRecord], turns: Iterable[Turn]) -> dict[str, SceneRecord]:
    """The scenes that still have a line among `turns`."""
    used = {t.scene_id for t in turns if t.scene_id}
    return {sid: s for sid, s in scenes.items() if sid in used}


def turn_dict(turn: Turn) -> dict[str, Any]:
    """A turn as the export dict holds it (actions as {"name", "arguments"} objects)."""
    return {**asdict(turn), "actions": [a.to_dict() for a in turn.actions]}


def check_session_id(session_id: Any, field_name: str = "session_id") -> None:
    if not isinstance(session_id, str) or not session_id:
        raise SessionError(f"{field_name}: must be a non-empty string, got {_show(session_id)}")
    if len(session_id) > MAX_SESSION_ID:
        raise SessionError(f"{field_name}: is {len(session_id)} characters long; the limit is {MAX_SESSION_ID}")


# Turn field -> longest allowed value. character_id is checked against the id pattern as well.
_TURN_FIELDS = {"character_id": 64, "player_line": MAX_LINE, "npc_line": MAX_LINE, "player_name": MAX_PLAYER_NAME,
                "character_version": 64, "emotion": 64, "scene_id": 64}
_OPTIONAL = {"player_name", "character_version", "emotion", "scene_id"}  # missing or null: ""
MAX_SCENES = 64  # scene records per session (the oldest goes first)
MAX_SCENE_CHARACTERS = 64  # in one stored scene record (the request limit is lower: config.RequestLimits)
MAX_SITUATION = 2000
MAX_TURN_ACTIONS = 16
MAX_RELATIONSHIP_VALUES = 4096  # per session: every character's, 8 each at most


def parse_export(data: Any, max_turns: int, where: str = "session", *,
                 format_field: str = "format") -> tuple[str, _Session]:
    """(session id, session) from an export dict, or SessionError naming the first bad field as the caller's
    input names it: `where` is its path, `format_field` its name for `format`."""
    if not isinstance(data, dict):
        raise SessionError(f"{where}: must be an object, got {type(data).__name__}")
    _no_unknown(data, {"format", "session_id", "updated_unix_ms", "turns", "relationships", "scenes"}, where)
    fmt = data.get("format")
    if fmt != EXPORT_FORMAT or isinstance(fmt, bool):
        raise SessionError(f"{where}.{format_field}: must be {EXPORT_FORMAT}, got {_show(fmt)}")
    sid = data.get("session_id")
    check_session_id(sid, f"{where}.session_id")
    updated = data.get("updated_unix_ms", 0)
    if isinstance(updated, bool) or not isinstance(updated, int) or updated < 0:
        raise SessionError(f"{where}.updated_unix_ms: must be a whole number >= 0, got {_show(updated)}")
    raw_turns = data.get("turns", [])
    if not isinstance(raw_turns, list):
        raise SessionError(f"{where}.turns: must be a list, got {type(raw_turns).__name__}")
    if len(raw_turns) > max_turns:
        raise SessionError(f"{where}.turns: has {len(raw_turns)} turns; the limit is {max_turns}")
    raw_relationships = data.get("relationships") or []
    if not isinstance(raw_relationships, list) or len(raw_relationships) > MAX_RELATIONSHIP_VALUES:
        raise SessionError(f"{where}.relationships: must be a list of at most {MAX_RELATIONSHIP_VALUES} values")
    relationships = {}
    for i, raw in enumerate(raw_relationships):
        if isinstance(raw, dict):
            _no_unknown(raw, {"character_id", "name", "value"}, f"{where}.relationships[{i}]")
        cid, name, value = _parse_relationship(raw, f"{where}.relationships[{i}]")
        relationships[cid, name] = value
    raw_scenes = data.get("scenes") or []
    if not isinstance(raw_scenes, list) or len(raw_scenes) > MAX_SCENES:
        raise SessionError(f"{where}.scenes: must be a list of at most {MAX_SCENES} scenes")
    scenes = {}
    for i, raw in enumerate(raw_scenes):
        scene = _parse_scene(raw, f"{where}.scenes[{i}]")
        scenes[scene.scene_id] = scene
    return sid, _Session([_parse_turn(raw, f"{where}.turns[{i}]") for i, raw in enumerate(raw_turns)], updated,
                         relationships, scenes)


def _parse_scene(raw: Any, where: str) -> SceneRecord:
    if not isinstance(raw, dict):
        raise SessionError(f"{where}: must be an object, got {type(raw).__name__}")
    _no_unknown(raw, {"scene_id", "situation", "character_ids"}, where)
    scene_id, situation, cast = raw.get("scene_id"), raw.get("situation"), raw.get("character_ids")
    if not isinstance(scene_id, str) or not ID_PATTERN.fullmatch(scene_id):
        raise SessionError(f"{where}.scene_id: must match [a-z0-9_-]{{1,64}}, got {_show(scene_id)}")
    if not isinstance(situation, str) or len(situation) > MAX_SITUATION:
        raise SessionError(f"{where}.situation: must be a string of at most {MAX_SITUATION} characters")
    if not isinstance(cast, list) or not 1 <= len(cast) <= MAX_SCENE_CHARACTERS:
        raise SessionError(f"{where}.character_ids: must be a list of 1 to {MAX_SCENE_CHARACTERS} ids")
    for i, cid in enumerate(cast):
        if not isinstance(cid, str) or not ID_PATTERN.fullmatch(cid):
            raise SessionError(f"{where}.character_ids[{i}]: must match [a-z0-9_-]{{1,64}}, got {_show(cid)}")
    return SceneRecord(scene_id, situation, tuple(cast))


def _parse_relationship(raw: Any, where: str) -> tuple[str, str, int]:
    """(character id, name, value) of a stored relationship value. Only the shape is checked here: the
    character's declaration may have changed since the save (the turn clamps a value to its range)."""
    if not isinstance(raw, dict):
        raise SessionError(f"{where}: must be an object, got {type(raw).__name__}")
    cid, name, value = raw.get("character_id"), raw.get("name"), raw.get("value")
    if not isinstance(cid, str) or not ID_PATTERN.fullmatch(cid):
        raise SessionError(f"{where}.character_id: must match [a-z0-9_-]{{1,64}}, got {_show(cid)}")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise SessionError(f"{where}.name: must match [a-z][a-z0-9_]{{0,31}}, got {_show(name)}")
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > VALUE_LIMIT:
        raise SessionError(f"{where}.value: must be a whole number between {-VALUE_LIMIT} and {VALUE_LIMIT}, "
                           f"got {_show(value)}")
    return cid, name, value


def _parse_turn(raw: Any, where: str) -> Turn:
    if not isinstance(raw, dict):
        raise SessionError(f"{where}: must be an object, got {type(raw).__name__}")
    _no_unknown(raw, {*_TURN_FIELDS, "actions"}, where)
    values = {}
    for name, limit in _TURN_FIELDS.items():
        value = raw.get(name)
        if value is None and name in _OPTIONAL:
            value = ""
        if not isinstance(value, str):
            raise SessionError(f"{where}.{name}: must be a string, got {_show(value)}")
        if len(value) > limit:
            raise SessionError(f"{where}.{name}: is {len(value)} characters long; the limit is {limit}")
        values[name] = value
    if not ID_PATTERN.fullmatch(values["character_id"]):
        raise SessionError(f"{where}.character_id: must match [a-z0-9_-]{{1,64}}, got {_show(values['character_id'])}")
    raw_actions = raw.get("actions") or []
    if not isinstance(raw_actions, list) or len(raw_actions) > MAX_TURN_ACTIONS:
        raise SessionError(f"{where}.actions: must be a list of at most {MAX_TURN_ACTIONS} actions")
    try:
        actions = tuple(action_from_dict(a, f"{where}.actions[{i}]") for i, a in enumerate(raw_actions))
    except UserError as e:
        raise SessionError(str(e)) from None
    return Turn(**values, actions=actions)


def _no_unknown(data: dict, known: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise SessionError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
