"""Reading a designer's YAML file defensively: size cap, no aliases, no duplicate keys, bounded nesting.

`yaml.safe_load` never runs code, but it does expand aliases, so a few hundred bytes of
"billion laughs" become a graph that explodes when anything walks it, and it silently keeps the
last of two equal keys. One cheap pass over the parser's events rejects both before loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sidecar.errors import UserError

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 16

# libyaml's event parser when present (fast); the pure-Python one otherwise. Both are iterative.
_EventLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
        size = path.stat().st_size
        if size > max_bytes:
            raise YamlFileError(path, None, f"file is {size} bytes; the limit is {max_bytes}")
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)  # the file may have grown since stat()
    except OSError as e:
        raise YamlFileError(path, None, f"cannot read: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise YamlFileError(path, None, f"file is over the limit of {max_bytes} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise YamlFileError(path, None, f"not UTF-8 text (byte {e.start})") from None
    try:
        _check_events(path, text)
        return yaml.safe_load(text), raw
    except yaml.MarkedYAMLError as e:
        parts = [f"{text} at line {mark.line + 1} column {mark.column + 1}" if mark else text
                 for text, mark in ((e.context, e.context_mark), (e.problem, e.problem_mark)) if text]
        raise YamlFileError(path, None, f"invalid YAML: {': '.join(parts)}") from None
    except yaml.YAMLError as e:
        raise YamlFileError(path, None, f"invalid YAML: {e}") from None


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


def _check_events(path: Path, text: str) -> None:
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
