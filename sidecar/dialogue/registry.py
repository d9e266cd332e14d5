"""The characters a server offers: scans `characters/`, hot-reloads changes, keeps the last good version.

Semantics (what ListCharacters shows, what Talk gets):
- READY: the newest files loaded; `get()` returns that version.
- FAILED, never loaded: `get()` raises CharacterUnavailable with the reason; version is "".
- FAILED after a good version (a broken edit, or an adapter the validator rejects): the status is
  FAILED with the error, and `version` / `get()` are still the last good version, which keeps
  serving until the files are fixed (then READY again) or deleted.
- A folder that disappears (or loses its character.yaml) disappears from the registry.

Change detection is cheap: each scan stats character.yaml and the adapter files, and only reads
and hashes a character whose stats changed. A character whose file failed to parse is re-read
every scan (a few KB), because the files it is waiting for (an adapter folder still being copied)
are not known until it parses; its error is logged once, not on every scan.

Adapters: with an `adapter_loader`, a character's adapter is read and validated before its
version is published (on the scanning thread), and the loader's result (the engine's AdapterRef:
the weights in memory) is kept with that version: `get_serving()` returns both, so the last good
version keeps serving from memory even if its files are overwritten or deleted later. Editing only
the persona keeps the loaded adapter. This is the one place validated adapters are kept.

Scans run on the caller's thread (`reload()`) or on one background thread (`start_watching()`);
`get()` and `list()` may be called from any thread. `on_change(character_id, status_or_None)`
runs on the scanning thread after a character was loaded, failed, recovered or removed.
"""

from __future__ import annotations

import enum
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from sidecar.dialogue.actions import ActionSpec
from sidecar.dialogue.characters import CHARACTER_FILE, Character, adapter_files, character_folders, load_character
from sidecar.errors import UserError

log = structlog.get_logger(__name__)


class UnknownCharacter(UserError):
    """No character with this id (the server maps it to NOT_FOUND)."""


class CharacterUnavailable(UserError):
    """The character's folder is there but it never loaded (FAILED_PRECONDITION); the message says why."""


class LoadState(enum.StrEnum):
    READY = "READY"
    FAILED = "FAILED"


@dataclass(frozen=True)
class CharacterStatus:
    """One line of ListCharacters."""

    id: str
    name: str
    version: str  # the version get() serves; "" when none ever loaded
    status: LoadState
    error: str = ""
    has_adapter: bool = False
    greeting: str = ""
    emotions: tuple[str, ...] = ()
    actions: tuple[ActionSpec, ...] = ()

    @property
    def serving(self) -> bool:
        """Whether Talk can use the character now: READY, or FAILED with a last good version."""
        return bool(self.version)


AdapterLoader = Callable[[Character], Any]  # raises UserError (AdapterError) or returns what get_serving() gives
OnChange = Callable[[str, CharacterStatus | None], None]


@dataclass
class _Entry:
    good: Character | None = None
    adapter: Any = None  # the adapter loader's result for good's adapter (None: no adapter or no loader)
    error: str = ""
    stamp: tuple | None = None  # stats behind the last attempt; None: retry on the next scan
    watch: tuple[Path, ...] = ()  # adapter files of the last parsed version


class CharacterRegistry:
    def __init__(self, root: Path, on_change: OnChange | None = None, adapter_loader: AdapterLoader | None = None,
                 also_scan: Callable[[], object] | None = None):
        """`also_scan`: run after every scan on the same thread (the lore folder's reload)."""
        self.root = Path(root)
        self._also_scan = also_scan
        if not self.root.is_dir():
            raise UserError(f"characters folder {self.root} not found")
        self._on_change, self._load_adapter = on_change, adapter_loader
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()  # guards _entries against readers on other threads
        self._scan_lock = threading.Lock()  # one scan at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reload()

    # --- reading --------------------------------------------------------------------------

    def get(self, character_id: str) -> Character:
        """The version to use for a new reply. Raises UnknownCharacter or CharacterUnavailable."""
        return self.get_serving(character_id)[0]

    def get_serving(self, character_id: str) -> tuple[Character, Any]:
        """The version to use for a new reply and its loaded adapter (None without one), taken together.
        Raises UnknownCharacter or CharacterUnavailable."""
        with self._lock:
            entry = self._entries.get(character_id)
            if entry is None:
                known = ", ".join(sorted(self._entries)[:20]) or "none"
                raise UnknownCharacter(f"unknown character {character_id!r} (known: {known})")
            if entry.good is None:
                raise CharacterUnavailable(f"character {character_id!r} failed to load: {entry.error}")
            return entry.good, entry.adapter

    def list(self) -> list[CharacterStatus]:
        with self._lock:
            return [_status(cid, e) for cid, e in sorted(self._entries.items())]

    def status(self, character_id: str) -> CharacterStatus | None:
        with self._lock:
            entry = self._entries.get(character_id)
            return _status(character_id, entry) if entry else None

    # --- scanning -------------------------------------------------------------------------

    def reload(self) -> list[str]:
        """Rescans the folder now; returns the ids whose status changed."""
        with self._scan_lock:
            found = self._folders()
            changed: list[str] = []
            for gone in sorted(set(self._entries) - set(found)):
                with self._lock:
                    del self._entries[gone]
                log.info("character removed", character=gone)
                changed.append(gone)
            for cid, folder in sorted(found.items()):
                if self._refresh(cid, folder):
                    changed.append(cid)
        for cid in changed:
            self._notify(cid)
        if self._also_scan is not None:
            try:
                self._also_scan()
            except Exception:  # the lore must never stop the characters' reloads
                log.exception("lore scan failed")
        return changed

    def _folders(self) -> dict[str, Path]:
        try:
            return character_folders(self.root)
        except OSError as e:
            log.warning("characters folder unreadable", folder=str(self.root), error=str(e))
            return {}

    def _refresh(self, cid: str, folder: Path) -> bool:
        """Loads one character if its files changed; True when its status changed."""
        entry = self._entries.get(cid) or _Entry()
        stamp = _stamp(folder, entry.watch)
        if entry.stamp is not None and entry.stamp == stamp:
            return False
        before = _status(cid, entry)
        good, adapter, error, parsed = entry.good, entry.adapter, "", None
        try:
            parsed = load_character(folder)
            if self._load_adapter is None or not parsed.has_adapter:
                adapter = None
            elif good is None or (parsed.adapter_version, parsed.lora_scale) != (good.adapter_version,
                                                                                 good.lora_scale):
                adapter = self._load_adapter(parsed)  # a persona-only edit keeps the loaded one
            good = parsed
        except UserError as e:
            error = str(e)
        except Exception as e:  # a broken character must never take the server down
            error = f"{type(e).__name__}: {e}"
            if error != entry.error:  # failed parses are retried every scan: one traceback is enough
                log.exception("character load crashed", character=cid)
        watch = adapter_files(parsed) if parsed else entry.watch
        # A parse failure is retried every scan (stamp None); so is a new set of adapter files, once,
        # because they were not part of `stamp` and may have changed while we read them.
        new = _Entry(good, adapter, error, stamp if parsed and watch == entry.watch else None, watch)
        with self._lock:
            self._entries[cid] = new
        if _status(cid, new) == before:
            return False
        if error:
            log.warning("character failed", character=cid, error=error, serving=good.version if good else None)
        else:
            log.info("character loaded", character=cid, version=good.version, adapter=good.has_adapter)
        return True

    def _notify(self, cid: str) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(cid, self.status(cid))
        except Exception:
            log.exception("on_change callback failed", character=cid)

    # --- hot reload -----------------------------------------------------------------------

    def start_watching(self, interval: float = 0.5) -> None:
        """Rescans every `interval` seconds on a daemon thread until stop_watching()."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(interval,), name="character-watch", daemon=True)
        self._thread.start()

    def stop_watching(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.reload()
            except Exception:
                log.exception("character scan failed")

    def __enter__(self) -> CharacterRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_watching()


def _status(cid: str, entry: _Entry) -> CharacterStatus:
    state = LoadState.FAILED if entry.error else LoadState.READY
    good = entry.good
    if good is None:
        return CharacterStatus(cid, "", "", state, entry.error)
    return CharacterStatus(cid, good.name, good.version, state, entry.error, good.has_adapter, good.greeting,
                           good.emotions, good.actions)


def _stamp(folder: Path, watch: tuple[Path, ...]) -> tuple:
    """What a changed file changes: size, mtime, ctime and inode (replaced by an editor's atomic save)."""
    out = []
    for path in (folder / CHARACTER_FILE, *watch):
        try:
            st = os.stat(path)
            out.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)
