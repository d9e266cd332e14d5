"""`--session-store FILE`: sessions survive a restart, and a crash loses at most a torn last line.

The file is a journal of JSON lines: a header, then one record per change of the SessionStore
(`turn`, `reset`, `put`; see sessions.py). Each record is written and flushed to the OS as the
change happens (a finished reply is on disk before the next one starts), so a killed process
loses nothing; the OS decides when it reaches the platter, except at compaction, which fsyncs.
Opening replays the journal and compacts it (one `put` per session, written to a temporary file
and renamed over the old one); so does closing, and so does a journal grown to several times what
it describes. A malformed line in the middle is refused with file and line (never silently
dropped); a torn last line, what a crash mid-write leaves, is dropped with a warning.

The growth compaction may write ~100 MB (default caps), so under an event loop it runs on a worker
thread: the loop takes a snapshot of the store (cheap: turns are immutable), the worker writes and
fsyncs it, and back on the loop the records journaled meanwhile (also in the old file) are appended
and fsynced before the rename. The new file is the snapshot then those records, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import structlog

from sidecar.dialogue.sessions import SessionError, SessionSnapshot, SessionStore, put_record
from sidecar.errors import UserError

log = structlog.get_logger(__name__)

HEADER = {"format": "npc-sidecar-sessions", "version": 1}
MIN_RECORDS_BEFORE_COMPACTING = 10_000

try:  # one server per file; advisory locks exist on POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class SessionFileError(UserError):
    """The session file cannot be used; the message names the file (and the line)."""


class SessionFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: IO[str] | None = None
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._records = 0  # appended since the last compaction
        self._write_failed = False
        self._compacting = 0  # the id of the background compaction under way; 0: none
        self._next_id = 0
        self._tail: list[str] | None = None  # lines journaled since its snapshot
        self._worker: ThreadPoolExecutor | None = None

    def open(self, store: SessionStore) -> int:
        """Loads the file into `store` (which must be empty), compacts it, then journals every change."""
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = open(lock, "a")  # noqa: SIM115 (held until close)
        except OSError as e:
            raise SessionFileError(f"--session-store: cannot use {self.path}: {e.strerror}") from None
        if fcntl is not None:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock.close()
                raise SessionFileError(f"--session-store: {self.path} is in use by another npc serve") from None
        if self.path.exists():
            self._replay(store)
        try:
            self._compact(store)
        except OSError as e:
            raise SessionFileError(f"--session-store: cannot write {self.path}: {e.strerror}") from None
        store.on_change = lambda record: self._append(record, store)
        return len(store)

    def close(self, store: SessionStore) -> None:
        """Compacts the journal and lets go of the file (at shutdown, after the last reply)."""
        store.on_change = None
        if self._worker is not None:  # a snapshot being written to the temp file this compaction rewrites
            self._worker.shutdown(wait=True)
            self._worker = None
        self._compacting, self._tail = 0, None  # (its completion, still queued on the loop, is ignored)
        if self._file is not None:
            try:
                self._compact(store)
            except OSError as e:  # every change is already in the journal: only the tidy-up failed
                log.error("session store: compaction failed", file=str(self.path), error=str(e))
            self._file.close()
            self._file = None
        self._lock.close()

    def _replay(self, store: SessionStore) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise SessionFileError(f"--session-store: cannot read {self.path}: {e}") from None
        torn_tail = lines[-1] != ""  # every complete record ends with a newline
        lines = lines[:-1] if not torn_tail else lines
        for number, line in enumerate(lines, start=1):
            last = number == len(lines)
            if number == 1:
                if line != json.dumps(HEADER):
                    raise SessionFileError(f"--session-store: {self.path} is not a session store file (its first "
                                           f"line is not {json.dumps(HEADER)}); choose another file")
                continue
            try:
                store.apply(json.loads(line))
            except (json.JSONDecodeError, SessionError) as e:
                if last and torn_tail:
                    log.warning("session store: dropped a torn last line (the server stopped mid-write)",
                                file=str(self.path), line=number)
                    break
                raise SessionFileError(f"--session-store: {self.path}:{number}: {e}; fix the line or move the "
                                       "file away (nothing was changed)") from None
        log.info("sessions restored", file=str(self.path), sessions=len(store))

    def _append(self, record: dict[str, Any], store: SessionStore) -> None:
        try:
            line = json.dumps(record, ensure_ascii=False) + "\n"
            self._file.write(line)
            self._file.flush()
            self._records += 1
            if self._tail is not None:
                self._tail.append(line)
            elif not self._compacting and self._records > max(MIN_RECORDS_BEFORE_COMPACTING, 4 * len(store)):
                self._start_compaction(store)
        except OSError as e:  # a full disk must not stop the NPCs talking: the store in memory is intact
            self._failed(e)

    def _failed(self, error: OSError) -> None:
        if not self._write_failed:
            log.error("session store: write failed; sessions are kept in memory", file=str(self.path),
                      error=str(error))
        self._write_failed = True

    def _start_compaction(self, store: SessionStore) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop to keep responsive: compact here and now
            self._compact(store)
            return
        self._next_id += 1
        self._compacting = self._next_id
        # The snapshot waits for the change being recorded to finish (a record may precede its change).
        loop.call_soon(self._snapshot, store, loop, self._compacting)

    def _snapshot(self, store: SessionStore, loop: asyncio.AbstractEventLoop, compaction: int) -> None:
        """On the loop: from here on, journaled lines also go to the tail; the worker writes the rest."""
        if compaction != self._compacting:
            return  # closed meanwhile
        self._tail = []
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="session-store")
        job = self._worker.submit(_write_snapshot, self._tmp, store.snapshot())

        def done(job: Future) -> None:  # on the worker thread
            try:
                loop.call_soon_threadsafe(self._finish, job, compaction)
            except RuntimeError:  # the loop has closed: close() compacted without it
                pass

        job.add_done_callback(done)

    def _finish(self, job: Future, compaction: int) -> None:
        """On the loop: the snapshot is on disk; the tail follows it, then the new file takes the journal's place."""
        if compaction != self._compacting:
            return
        tail, self._tail, self._compacting = self._tail or [], None, 0
        try:
            job.result()
            self._swap(tail)
        except OSError as e:  # the old journal still holds every record
            self._failed(e)
            self._records = 0  # tried again after as many records as led to this try, not on the next one

    def _compact(self, store: SessionStore) -> None:
        """Rewrites the file as one record per session: temp file, fsync, rename (never half a file)."""
        _write_snapshot(self._tmp, store.snapshot())
        self._swap([])

    def _swap(self, tail: list[str]) -> None:
        """Renames the temp file over the journal, after `tail` (lines journaled since its snapshot)."""
        if tail:
            with open(self._tmp, "a", encoding="utf-8") as f:
                f.writelines(tail)
                f.flush()
                os.fsync(f.fileno())
        if self._file is not None:
            self._file.close()
        try:
            os.replace(self._tmp, self.path)
        finally:  # journal on, into whichever file now holds the sessions
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held until close)
        self._records = len(tail)


def _write_snapshot(path: Path, snapshot: list[SessionSnapshot]) -> None:
    """The header and one `put` per session, fsynced (a worker thread may run this: it touches nothing shared)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(HEADER) + "\n")
        for entry in snapshot:
            f.write(json.dumps(put_record(entry), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
