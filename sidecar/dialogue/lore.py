"""World lore: `characters/lore/*.yaml`, entries scoped to who may know them, hot-reloaded.

    # characters/lore/highmoor.yaml
    scope: {places: [highmoor]}            # the file's default scope (default: everyone)
    entries:
      - Torvik's Drowned Lantern is the only tavern in Highmoor.
      - text: The king is dying, and the council keeps it quiet.
        scope: {factions: [council], characters: [oracle]}

A scope is `everyone` or any of `factions`, `places`, `characters`: a character sees an entry when
it belongs to one listed faction or place (its character.yaml `factions` / `places`) or is named.
Factions and places must be declared in `characters/lore/world.yaml` (`factions: [...]`,
`places: [...]`), so that a typo is an error, not an entry nobody ever sees.

Every problem is a LoreError naming the file and the field. Each file is loaded on its own: a
broken edit leaves that file's last good entries serving (like a character), and the other files
are untouched. `LoreLibrary.snapshot()` is an immutable view (the retrieval index is built from it).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from sidecar.dialogue.characters import CHARACTER_FILE, ID_PATTERN, Character
from sidecar.dialogue.yaml_file import MAX_FILE_BYTES, YamlFileError, read_yaml

log = structlog.get_logger(__name__)

LORE_FOLDER = "lore"  # inside the characters folder; not a character (it holds no character.yaml)
WORLD_FILE = "world.yaml"
MAX_ENTRY_CHARS = 400  # one entry is one or two sentences: what a prompt can spend on one fact
MAX_ENTRIES_PER_FILE = 20_000
SCOPE_KINDS = ("factions", "places", "characters")


class LoreError(YamlFileError):
    """A lore file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Scope:
    """Who may know an entry. everyone, or the union of the listed groups."""

    everyone: bool = True
    factions: frozenset[str] = frozenset()
    places: frozenset[str] = frozenset()
    characters: frozenset[str] = frozenset()

    def admits(self, character: Character) -> bool:
        return (self.everyone or character.id in self.characters
                or not self.factions.isdisjoint(character.factions) or not self.places.isdisjoint(character.places))


EVERYONE = Scope()


@dataclass(frozen=True)
class LoreEntry:
    text: str
    scope: Scope
    source: str  # "highmoor.yaml#3": where a designer finds it


@dataclass(frozen=True)
class World:
    """The factions and places lore scopes may name (lore/world.yaml)."""

    factions: frozenset[str] = frozenset()
    places: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LoreFileStatus:
    name: str
    entries: int  # of the version serving (the last good one)
    error: str  # "" when the newest version loaded


@dataclass(frozen=True)
class LoreSnapshot:
    entries: tuple[LoreEntry, ...]
    files: tuple[LoreFileStatus, ...]
    world: World
    version: int  # grows with every change: the retrieval index is rebuilt when it moves


def read_world(path: Path) -> World:
    if not os.path.lexists(path):
        return World()
    data = _read(path)
    if not isinstance(data, dict):
        raise LoreError(path, None, "must be a mapping with `factions` and `places` lists")
    unknown = set(data) - {"factions", "places"}
    if unknown:
        raise LoreError(path, str(sorted(unknown)[0]), "unknown field (known fields here: factions, places)")
    return World(_names(path, data, "factions"), _names(path, data, "places"))


def read_lore_file(path: Path, world: World) -> tuple[LoreEntry, ...]:
    """The entries of one lore file. Raises LoreError."""
    data = _read(path)
    if data is None:
        return ()
    if not isinstance(data, dict):
        raise LoreError(path, None, "must be a mapping with `entries` (a list) and optionally `scope`")
    unknown = set(data) - {"entries", "scope"}
    if unknown:
        raise LoreError(path, str(sorted(unknown)[0]), "unknown field (known fields here: entries, scope)")
    default = _scope(path, "scope", data.get("scope", "everyone"), world)
    raw = data.get("entries") or []
    if not isinstance(raw, list):
        raise LoreError(path, "entries", "must be a list (lines starting with '- ')")
    if len(raw) > MAX_ENTRIES_PER_FILE:
        raise LoreError(path, "entries", f"has {len(raw)} entries; the limit is {MAX_ENTRIES_PER_FILE} per file")
    out = []
    for i, item in enumerate(raw):
        where = f"entries[{i}]"
        scope = default
        if isinstance(item, dict):
            extra = set(item) - {"text", "scope"}
            if extra:
                raise LoreError(path, f"{where}.{sorted(extra)[0]}", "unknown field (known fields here: scope, text)")
            if "scope" in item:
                scope = _scope(path, f"{where}.scope", item["scope"], world)
            item, where = item.get("text"), f"{where}.text"
        out.append(LoreEntry(_entry_text(path, where, item), scope, f"{path.name}#{i}"))
    return tuple(out)


class LoreLibrary:
    """The lore folder, rescanned on demand (`reload()`, called by the characters watcher)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._files: dict[str, tuple[tuple, tuple[LoreEntry, ...], str]] = {}  # name -> (stamp, good, error)
        self._world: tuple[tuple, World, str] = ((), World(), "")
        self._snapshot = LoreSnapshot((), (), World(), 0)

    def snapshot(self) -> LoreSnapshot:
        return self._snapshot

    def reload(self) -> bool:
        """Rescans the folder; True when what serves (or an error) changed."""
        with self._lock:
            changed = self._reload_world()
            names = self._file_names()
            for gone in set(self._files) - set(names):
                del self._files[gone]
                log.info("lore file removed", file=gone)
                changed = True
            for name in names:
                changed |= self._refresh(name, force=changed and name in self._files)
            if changed:
                old = self._snapshot
                files = tuple(LoreFileStatus(n, len(good), err) for n, (_, good, err) in sorted(self._files.items()))
                entries = tuple(e for _, (_, good, _) in sorted(self._files.items()) for e in good)
                self._snapshot = LoreSnapshot(entries, files, self._world[1], old.version + 1)
            return changed

    def _file_names(self) -> list[str]:
        try:
            with os.scandir(self.folder) as it:
                return sorted(e.name for e in it if e.name.endswith(".yaml") and not e.name.startswith(".")
                              and e.name not in (WORLD_FILE, CHARACTER_FILE))
        except OSError:
            return []

    def _reload_world(self) -> bool:
        path = self.folder / WORLD_FILE
        stamp = _stamp(path)
        if stamp == self._world[0] and not self._world[2]:
            return False
        try:
            world, error = read_world(path), ""
        except LoreError as e:
            world, error = self._world[1], str(e)
        changed = (world, error) != self._world[1:]
        if changed and error:
            log.warning("lore world file failed", error=error)
        self._world = (stamp, world, error)
        return changed

    def _refresh(self, name: str, force: bool) -> bool:
        path = self.folder / name
        stamp = _stamp(path)
        new_file = name not in self._files
        old_stamp, good, old_error = self._files.get(name, ((), (), ""))
        if stamp == old_stamp and not force:
            return False
        try:
            entries, error = read_lore_file(path, self._world[1]), ""
        except LoreError as e:
            entries, error = good, str(e)  # the last good version keeps serving
        except Exception as e:  # a broken file must never take the server down
            entries, error = good, f"{path}: cannot be read ({type(e).__name__}: {e})"
        self._files[name] = (stamp, entries, error)
        if error and error != old_error:
            log.warning("lore file failed", file=name, error=error, serving=len(entries))
        elif not error:
            log.info("lore file loaded", file=name, entries=len(entries))
        return new_file or entries != good or error != old_error


def _read(path: Path) -> Any:
    try:
        return read_yaml(path, MAX_FILE_BYTES * 8)[0]
    except YamlFileError as e:
        raise LoreError(e.path, e.field, e.problem) from None


def _names(path: Path, data: dict, key: str, where: str = "") -> frozenset[str]:
    values = data.get(key) or []
    field = f"{where}.{key}" if where else key
    if not isinstance(values, list):
        raise LoreError(path, field, "must be a list of names")
    for i, v in enumerate(values):
        if not isinstance(v, str) or not ID_PATTERN.fullmatch(v):
            raise LoreError(path, f"{field}[{i}]", f"must be a name of [a-z0-9_-] (1-64 characters), got {v!r:.60}")
    return frozenset(values)


def _scope(path: Path, where: str, value: Any, world: World) -> Scope:
    if value == "everyone":
        return EVERYONE
    if not isinstance(value, dict) or not value:
        raise LoreError(path, where, "must be `everyone` or a mapping of factions / places / characters lists")
    extra = set(value) - set(SCOPE_KINDS)
    if extra:
        raise LoreError(path, f"{where}.{sorted(extra)[0]}", "unknown scope kind (known: characters, factions, "
                                                             "places, or the word everyone)")
    groups = {kind: _names(path, value, kind, where) if kind in value else frozenset() for kind in SCOPE_KINDS}
    if not any(groups.values()):
        raise LoreError(path, where, "names nobody: list at least one faction, place or character")
    for kind in ("factions", "places"):
        declared = getattr(world, kind)
        for name in sorted(groups[kind]):
            if name not in declared:
                known = ", ".join(sorted(declared)) or "none yet"
                raise LoreError(path, f"{where}.{kind}", f"unknown {kind[:-1]} {name!r}: declare it in "
                                                         f"{LORE_FOLDER}/{WORLD_FILE} ({kind}: {known})")
    return Scope(False, groups["factions"], groups["places"], groups["characters"])


def _entry_text(path: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise LoreError(path, where, "must be a non-empty string (one or two sentences)")
    text = " ".join(value.split())  # one line: a newline inside the prompt's list could pose as a new section
    if len(text) > MAX_ENTRY_CHARS:
        raise LoreError(path, where, f"is {len(text)} characters long; the limit is {MAX_ENTRY_CHARS} "
                                     "(split it into entries the retrieval can pick one by one)")
    if any(ord(c) < 32 or c == "\x7f" for c in text):
        raise LoreError(path, where, "holds control characters")
    return text


def _stamp(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (None,)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
