"""Reading a designer's YAML file defensively: size cap, no aliases, no duplicate keys, bounded nesting.

The safe loader never runs code (`!!python/...` tags are errors), but it does expand aliases, so a
few hundred bytes of "billion laughs" become a graph that explodes when anything walks it, and it
silently keeps the last of two equal keys. One cheap pass over the parser's events rejects both
before loading, and records which field starts where, so that a value the loader cannot build
(`2024-02-30`, a 5000-digit number) is reported with its field.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from sidecar.errors import UserError

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 16

# libyaml's parser when present: ~10x faster than the pure-Python one, which matters because a file
# that fails to load is read again on every scan. Nesting is bounded before loading (MAX_DEPTH).
_EventLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _BadValue(yaml.constructor.ConstructorError):
    """A scalar the loader cannot build, e.g. `2024-02-30` or a number of 5000 digits."""


class _Loader(_EventLoader):  # type: ignore[valid-type, misc]
    """The safe loader; a value it cannot build is a YAML error with a position, not a bare ValueError."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as e:
            raise _BadValue(None, None, f"cannot read the value {_clip(str(node.value))} ({e})",
                            node.start_mark) from None


class YamlFileError(UserError):
    """A YAML file that cannot be read; the message names the file and, where known, the field."""

    def __init__(self, path: object, field: str | None, problem: str):
        super().__init__(f"{path}: {field}: {problem}" if field else f"{path}: {problem}")
        self.path = str(path)
        self.field = field
        self.problem = problem


def read_yaml(path: Path, max_bytes: int = MAX_FILE_BYTES) -> tuple[Any, bytes]:
    """(loaded document, the file's bytes). Raises YamlFileError."""
    try:
        # O_NONBLOCK: opening a FIFO planted as the file must not hang the scan; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise YamlFileError(path, None, "not a regular file")
            if info.st_size > max_bytes:  # refused on its size: a huge file is never read
                raise YamlFileError(path, None, f"file is {info.st_size} bytes; the limit is {max_bytes}")
            raw = f.read(max_bytes + 1)  # the file may have grown since fstat()
    except OSError as e:
        raise YamlFileError(path, None, f"cannot read: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise YamlFileError(path, None, f"file is over the limit of {max_bytes} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise YamlFileError(path, None, f"not UTF-8 text (byte {e.start})") from None
    fields: dict[tuple[int, int], str] = {}
    try:
        _check_events(path, text, fields)
        return yaml.load(text, Loader=_Loader), raw
    except yaml.MarkedYAMLError as e:
        parts = [f"{what} at line {mark.line + 1} column {mark.column + 1}" if mark else what
                 for what, mark in ((e.context, e.context_mark), (e.problem, e.problem_mark)) if what]
        mark = e.problem_mark
        field = fields.get((mark.line, mark.column)) if isinstance(e, _BadValue) and mark else None
        if mark and text[mark.index:mark.index + 1] == "\t":
            parts.append("YAML is indented with spaces, not tabs")
        raise YamlFileError(path, field, f"invalid YAML: {': '.join(parts)}") from None
    except yaml.reader.ReaderError as e:  # a control character or NUL byte; libyaml counts bytes
        line = text.encode()[:e.position].count(b"\n") + 1
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise YamlFileError(path, None, f"invalid YAML: character {char} at line {line}: {e.reason}") from None
    except yaml.YAMLError as e:
        raise YamlFileError(path, None, f"invalid YAML: {e}") from None


def _clip(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class _Frame:
    """One open mapping or sequence while walking the events."""

    def __init__(self, field: str, is_mapping: bool):
        self.field, self.is_mapping = field, is_mapping
        self.keys: set[str] = set()
        self.expect_key = True
        self.last_key = ""
        self.index = 0

    def child_field(self) -> str:
        if self.is_mapping:
            return f"{self.field}.{self.last_key}" if self.field else self.last_key
        return f"{self.field}[{self.index}]"


def _check_events(path: Path, text: str, fields: dict[tuple[int, int], str]) -> None:
    """Rejects aliases, duplicate keys and deep nesting; fills `fields`: (line, column) of each value -> field."""
    stack: list[_Frame] = []
    for event in yaml.parse(text, Loader=_EventLoader):
        if isinstance(event, yaml.AliasEvent):
            field = stack[-1].child_field() if stack else None
            raise YamlFileError(path, field, f"YAML aliases (*{event.anchor}) are not allowed; write the value out")
        if isinstance(event, yaml.CollectionEndEvent):
            stack.pop()
            _advance(stack)
            continue
        if not isinstance(event, yaml.NodeEvent):
            continue  # stream / document start and end
        top = stack[-1] if stack else None
        if top is not None and top.is_mapping and top.expect_key:
            key = event.value if isinstance(event, yaml.ScalarEvent) else "?"  # "?": a complex key
            if key in top.keys and key != "?":
                field = f"{top.field}.{key}" if top.field else key
                raise YamlFileError(path, field, f"appears twice (again on line {event.start_mark.line + 1})")
            top.keys.add(key)
            top.last_key = key
        elif top is not None:
            fields[(event.start_mark.line, event.start_mark.column)] = top.child_field()
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise YamlFileError(path, top.child_field() if top else None, f"nested deeper than {MAX_DEPTH}")
            field = top.child_field() if top else ""
            stack.append(_Frame(field, isinstance(event, yaml.MappingStartEvent)))
        else:
            _advance(stack)


def _advance(stack: list[_Frame]) -> None:
    """A whole node (scalar or closed collection) was consumed inside the top frame."""
    if not stack:
        return
    top = stack[-1]
    if top.is_mapping:
        top.expect_key = not top.expect_key
    else:
        top.index += 1
