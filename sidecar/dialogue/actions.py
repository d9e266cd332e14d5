"""Character actions: what a character may do (character.yaml `actions`), what a request says exists
(its entity lists and allowed actions), and the actions a reply took.

An action's arguments are typed: an enum (values declared in the file, or taken from one of the
request's entity lists), an integer within a range, a short string, a boolean. A reply's actions are
decoded under a grammar built from these (dialogue/reply_format.py), so they are valid by
construction; `check_action` checks them once more before they reach a game.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sidecar.errors import UserError

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")  # action, argument and entity list names
MAX_ACTIONS = 16  # per character
MAX_ARGUMENTS = 8  # per action
MAX_ENUM_VALUES = 64  # static enum values
MAX_VALUE_CHARS = 64  # one enum value or entity
MAX_DESCRIPTION = 200
MAX_ACTIONS_PER_REPLY = 3
ARGUMENT_TYPES = ("enum", "integer", "string", "boolean")

Value = str | int | bool
Entities = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class Argument:
    name: str
    type: str  # one of ARGUMENT_TYPES
    values: tuple[str, ...] = ()  # enum: the declared values...
    values_from: str = ""  # ...or the name of the request's entity list that gives them
    min: int = 0  # integer: inclusive range
    max: int = 0
    max_chars: int = 32  # string

    def choices(self, entities: Entities) -> tuple[str, ...]:
        """An enum's values in a turn: declared, or the request's list (empty when the request gives none)."""
        return tuple(entities.get(self.values_from, ())) if self.values_from else self.values

    def schema(self, entities: Entities) -> dict:
        """The JSON schema of this argument's value in a turn."""
        if self.type == "enum":
            return {"enum": list(self.choices(entities))}
        if self.type == "integer":
            return {"type": "integer", "minimum": self.min, "maximum": self.max}
        if self.type == "string":
            return {"type": "string", "minLength": 1, "maxLength": self.max_chars}
        return {"type": "boolean"}

    def describe(self) -> str:
        """How the prompt shows the argument's value to the model."""
        if self.type == "enum":
            return f"<one of {self.values_from}>" if self.values_from else "|".join(self.values)
        if self.type == "integer":
            return f"<{self.min}-{self.max}>"
        return "<text>" if self.type == "string" else "true|false"


@dataclass(frozen=True)
class ActionSpec:
    """One action a character may take, as character.yaml declares it."""

    name: str
    description: str
    arguments: tuple[Argument, ...] = ()
    effects: tuple[tuple[str, str], ...] = ()  # passed to the game untouched

    def available(self, entities: Entities) -> bool:
        """Whether the action can be taken this turn: every enum has at least one value."""
        return all(a.type != "enum" or a.choices(entities) for a in self.arguments)

    def schema(self, entities: Entities) -> dict:
        """The JSON schema of the arguments object, properties in declaration order, all required."""
        return {"type": "object", "properties": {a.name: a.schema(entities) for a in self.arguments},
                "required": [a.name for a in self.arguments], "additionalProperties": False}


@dataclass(frozen=True)
class Action:
    """An action a reply took: what the game executes."""

    name: str
    arguments: tuple[tuple[str, Value], ...] = ()  # in the schema's order

    @property
    def arguments_json(self) -> str:
        return json.dumps(dict(self.arguments), ensure_ascii=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "arguments": dict(self.arguments)}


def action_from_dict(data: object, where: str) -> Action:
    """An Action from {"name": ..., "arguments": {...}} (a session file, training data); shape only."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or set(data) - {"name", "arguments"}:
        raise UserError(f'{where}: must be {{"name": ..., "arguments": {{...}}}}')
    arguments = data.get("arguments") or {}
    if not isinstance(arguments, dict) or not all(isinstance(v, str | int | bool) for v in arguments.values()):
        raise UserError(f"{where}.arguments: must map names to strings, whole numbers or booleans")
    return Action(data["name"], tuple(arguments.items()))


def check_action(specs: Sequence[ActionSpec], action: Action, entities: Entities,
                 allowed: Sequence[str] | None = None) -> str | None:
    """Why `action` is not one the game can execute in this turn (None: it is)."""
    spec = next((s for s in specs if s.name == action.name), None)
    if spec is None:
        return f"the character has no action {action.name!r}"
    if allowed is not None and action.name not in allowed:
        return f"action {action.name!r} is not allowed in this turn"
    given = dict(action.arguments)
    if set(given) != {a.name for a in spec.arguments}:
        return f"{action.name}: arguments {sorted(given)}, expected {[a.name for a in spec.arguments]}"
    for arg in spec.arguments:
        value = given[arg.name]
        if arg.type == "enum" and value not in arg.choices(entities):
            return f"{action.name}.{arg.name}: {value!r} is not one of {list(arg.choices(entities))}"
        if arg.type == "integer" and (isinstance(value, bool) or not isinstance(value, int)
                                      or not arg.min <= value <= arg.max):
            return f"{action.name}.{arg.name}: {value!r} is not a whole number in [{arg.min}, {arg.max}]"
        if arg.type == "string" and (not isinstance(value, str) or not 1 <= len(value) <= arg.max_chars):
            return f"{action.name}.{arg.name}: must be text of 1-{arg.max_chars} characters"
        if arg.type == "boolean" and not isinstance(value, bool):
            return f"{action.name}.{arg.name}: must be true or false"
    return None


def plain_text_problem(value: str, special_tokens: frozenset[str] = frozenset()) -> str | None:
    """Why a name or value cannot sit in a prompt line and a grammar literal (None: it can)."""
    if any(unicodedata.category(c) in ("Cc", "Cs") or c in "\u2028\u2029\x85" for c in value):
        return "holds control characters or line breaks"
    if any(unicodedata.category(c) == "Cn" for c in value):
        return "holds unassigned code points"
    token = next((t for t in special_tokens if t in value), None)
    if token is not None:
        return f"holds the model's control token {token!r}"
    return None


def check_entities(entities: Mapping[str, Sequence[str]], *, max_lists: int, max_values: int, max_chars: int,
                   special_tokens: frozenset[str] = frozenset(), spellable: Callable[[str], bool] | None = None,
                   field: str = "entities") -> dict[str, tuple[str, ...]]:
    """A request's entity lists, checked; raises UserError naming the field."""
    if len(entities) > max_lists:
        raise UserError(f"{field}: has {len(entities)} lists; the limit is {max_lists}")
    out = {}
    for name, values in sorted(entities.items()):
        if not NAME_PATTERN.fullmatch(name):
            raise UserError(f"{field}: list name {name[:40]!r} must match [a-z][a-z0-9_]{{0,31}}")
        if len(values) > max_values:
            raise UserError(f"{field}[{name}]: has {len(values)} values; the limit is {max_values}")
        for i, value in enumerate(values):
            where = f"{field}[{name}].values[{i}]"
            if not value.strip() or len(value) > max_chars:
                raise UserError(f"{where}: must be 1-{max_chars} characters, got {len(value)}")
            problem = plain_text_problem(value, special_tokens)
            if problem is None and spellable is not None and not spellable(value):
                problem = "holds characters the model's tokenizer cannot write"
            if problem:
                raise UserError(f"{where}: {problem}")
        if len(set(values)) != len(values):
            raise UserError(f"{field}[{name}]: holds a value twice")
        out[name] = tuple(values)
    return out


def check_allowed(specs: Sequence[ActionSpec], names: Sequence[str], character_id: str,
                  field: str = "allowed_actions.names") -> tuple[str, ...]:
    """A request's allowed actions, each one the character has; raises UserError naming the entry."""
    known = {s.name for s in specs}
    for i, name in enumerate(names):
        if name not in known:
            have = ", ".join(sorted(known)) or "none"
            raise UserError(f"{field}[{i}]: character {character_id!r} has no action {name[:40]!r} "
                            f"(its actions: {have})")
    return tuple(names)
