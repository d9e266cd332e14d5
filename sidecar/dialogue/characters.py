"""A character: `characters/<id>/character.yaml` (+ an optional PEFT adapter folder), validated.

Every problem is a CharacterError whose message names the file and the field, e.g.
`characters/elf/character.yaml: generation.temperature: must be a number between 0 and 2, got 'hot'`.
The schema is documented field by field in characters/README.md.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.dialogue.actions import (
    ARGUMENT_TYPES,
    MAX_ACTIONS,
    MAX_ARGUMENTS,
    MAX_DESCRIPTION,
    MAX_ENUM_VALUES,
    MAX_VALUE_CHARS,
    NAME_PATTERN,
    ActionSpec,
    Argument,
    plain_text_problem,
)
from sidecar.dialogue.relationships import (
    EFFECT_PATTERN,
    MAX_RELATIONSHIPS,
    MAX_TIER_TEXT,
    MAX_TIERS,
    VALUE_LIMIT,
    RelationshipSpec,
    Tier,
)
from sidecar.dialogue.yaml_file import MAX_FILE_BYTES, YamlFileError, read_yaml
from sidecar.model.adapter_files import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, MAX_CONFIG_BYTES, adapter_digest

CHARACTER_FILE = "character.yaml"
# Hashing reads these whole on every change: a planted 50 GB file must be refused by its size first.
# (The loader in model/lora.py holds the weights to the tighter bound the base model implies.)
ADAPTER_FILE_LIMITS = {ADAPTER_CONFIG: MAX_CONFIG_BYTES, ADAPTER_WEIGHTS: 2 << 30}
ID_PATTERN = re.compile(r"[a-z0-9_-]{1,64}")
MAX_TEXT = 20_000  # characters in one string field; the token budget is the real limit
MAX_ITEMS = 256  # entries in one list field


class CharacterError(YamlFileError):
    """A character file or adapter folder that cannot be used; the message names file and field."""


@dataclass(frozen=True)
class StyleExample:
    """One sample exchange showing how the character talks; given to the model as a prior turn."""

    player: str
    npc: str


@dataclass(frozen=True)
class Generation:
    """Sampling defaults for this character; a request's own options override them."""

    max_tokens: int = 80
    temperature: float = 0.7
    top_p: float = 0.9
    min_p: float = 0.0  # 0 = off (engine.api.SamplingParams.min_p)
    max_tokens_limit: int | None = None  # longest reply a request may ask of this character (None: server's cap)


@dataclass(frozen=True)
class Memory:
    """How much of a conversation the prompt carries (the token budget may cut it further)."""

    max_turns: int = 8


@dataclass(frozen=True)
class Character:
    id: str
    name: str
    persona: str
    version: str  # content hash of character.yaml + adapter files: any change gives a new version
    folder: Path  # resolved character folder
    greeting: str = ""
    knowledge: tuple[str, ...] = ()
    # per knowledge line, how players ask for it (its `asked_as:`; () for none, and () for the whole field when
    # no line has any): retrieval.py matches the player's line against these as well as the line itself
    asked_as: tuple[tuple[str, ...], ...] = ()
    factions: frozenset[str] = frozenset()  # which scoped lore reaches the character (dialogue/lore.py)
    places: frozenset[str] = frozenset()
    emotions: tuple[str, ...] = ()  # the model writes one of these before each line
    actions: tuple[ActionSpec, ...] = ()  # what the character may do (dialogue/actions.py)
    relationships: tuple[RelationshipSpec, ...] = ()  # per-session values (dialogue/relationships.py)
    style_examples: tuple[StyleExample, ...] = ()
    generation: Generation = field(default_factory=Generation)
    memory: Memory = field(default_factory=Memory)
    adapter: str | None = None  # as written in the file (relative to the folder)
    adapter_path: Path | None = None  # resolved, inside `folder`
    adapter_version: str | None = None  # hash of the adapter files alone (the start of the loader's fingerprint)
    lora_scale: float = 1.0

    @property
    def has_adapter(self) -> bool:
        return self.adapter_path is not None

    @property
    def source(self) -> Path:
        return self.folder / CHARACTER_FILE


def load_character(folder: Path) -> Character:
    """Reads and validates `folder/character.yaml`. Raises CharacterError.

    Nothing outside the characters folder (`folder`'s parent) is read: the character folder may be
    a symbolic link only to a folder inside it, and character.yaml and the adapter's files only to
    files inside the character folder.
    """
    folder = Path(folder)
    path = folder / CHARACTER_FILE
    home = _real(folder)
    if not home.is_relative_to(_real(folder.parent)):
        raise CharacterError(path, None, f"the character folder is a symbolic link to {home}, outside the "
                                         f"characters folder; copy the character in instead")
    if not _real(path).is_relative_to(home):
        raise CharacterError(path, None, f"is a symbolic link to {_real(path)}, outside the character folder")
    try:
        data, raw = read_yaml(path, MAX_FILE_BYTES)
    except YamlFileError as e:
        raise CharacterError(e.path, e.field, e.problem) from None
    f = _Fields(path, data)
    char_id = f.text("id")
    if not ID_PATTERN.fullmatch(char_id):
        f.fail("id", f"must match [a-z0-9_-]{{1,64}} (lowercase letters, digits, _ and -), got {_show(char_id)}")
    if char_id != folder.name:
        f.fail("id", f"must equal the folder name {folder.name!r}, got {char_id!r}")
    name = f.text("name", max_len=200)
    persona = f.text("persona")
    greeting = f.text("greeting", required=False)
    knowledge, asked_as = _knowledge(f)
    factions, places = f.name_set("factions"), f.name_set("places")
    emotions = f.text_list("emotions", max_len=64)
    for i, label in enumerate(emotions):
        if any(c in label for c in "[]") or plain_text_problem(label):
            f.fail(f"emotions[{i}]", f"must be a word or short phrase without brackets, line breaks or control "
                                     f"characters, got {_show(label)}")
    if len(set(emotions)) != len(emotions):
        f.fail("emotions", "holds a label twice")
    actions = _actions(f)
    relationships = _relationships(f, actions)
    style = tuple(StyleExample(**ex) for ex in f.mapping_list("style_examples", ("player", "npc")))
    gen, mem = f.section("generation"), f.section("memory")
    generation = Generation(
        max_tokens=gen.integer("max_tokens", 1, 4096, Generation.max_tokens),
        temperature=gen.number("temperature", 0.0, 2.0, Generation.temperature),
        top_p=gen.number("top_p", 0.0, 1.0, Generation.top_p, low_open=True),
        min_p=gen.number("min_p", 0.0, 1.0, Generation.min_p),
        max_tokens_limit=gen.integer("max_tokens_limit", 1, 4096, None),
    )
    if generation.max_tokens_limit is not None and generation.max_tokens > generation.max_tokens_limit:
        gen.fail("max_tokens", f"{generation.max_tokens} is above generation.max_tokens_limit "
                               f"({generation.max_tokens_limit})")
    gen.done()
    memory = Memory(max_turns=mem.integer("max_turns", 0, 1000, Memory.max_turns))
    mem.done()
    adapter = f.text("adapter", required=False, max_len=1000) or None
    lora_scale = f.number("lora_scale", 0.0, 4.0, 1.0)
    if "lora_scale" in f.data and adapter is None:
        f.fail("lora_scale", "set, but the character has no adapter")
    f.done()

    adapter_path = _resolve_adapter(path, home, adapter) if adapter else None
    adapter_hash = _hash_files(path, adapter_path) if adapter_path else None
    version = hashlib.sha256(raw + b"\0" + (adapter_hash or b"")).hexdigest()[:12]
    return Character(
        id=char_id, name=name, persona=persona, version=version, folder=home, greeting=greeting,
        knowledge=knowledge, asked_as=asked_as, factions=factions, places=places, emotions=emotions, actions=actions,
        relationships=relationships, style_examples=style, generation=generation,
        memory=memory,
        adapter=adapter, adapter_path=adapter_path, lora_scale=lora_scale,
        adapter_version=adapter_hash.hex()[:12] if adapter_hash else None,
    )


def _actions(f: _Fields) -> tuple[ActionSpec, ...]:
    """character.yaml `actions` (format in characters/README.md)."""
    raw = f._list("actions")
    if len(raw) > MAX_ACTIONS:
        f.fail("actions", f"has {len(raw)} actions; the limit is {MAX_ACTIONS}")
    specs: list[ActionSpec] = []
    for i, value in enumerate(raw):
        a = _Fields(f.path, value, f"actions[{i}].")
        name = a.text("name", max_len=32)
        if not NAME_PATTERN.fullmatch(name):
            a.fail("name", f"must match [a-z][a-z0-9_]{{0,31}}, got {_show(name)}")
        if any(s.name == name for s in specs):
            a.fail("name", f"{name!r} is declared twice")
        description = a.text("description", max_len=MAX_DESCRIPTION)
        args_section = a.section("arguments")
        if len(args_section.data) > MAX_ARGUMENTS:
            a.fail("arguments", f"has {len(args_section.data)} arguments; the limit is {MAX_ARGUMENTS}")
        arguments = tuple(_argument(args_section, key) for key in list(args_section.data))
        effects_section = a.section("effects")
        effects = tuple((str(k), effects_section.text(str(k), max_len=200)) for k in list(effects_section.data))
        a.done()
        specs.append(ActionSpec(name, description, arguments, effects))
    return tuple(specs)


def _relationships(f: _Fields, actions: tuple[ActionSpec, ...]) -> tuple[RelationshipSpec, ...]:
    """character.yaml `relationships` (format in dialogue/relationships.py and characters/README.md)."""
    section = f.section("relationships")
    if len(section.data) > MAX_RELATIONSHIPS:
        section.fail(None, f"has {len(section.data)} relationships; the limit is {MAX_RELATIONSHIPS}")
    specs = []
    for key in list(section.data):
        if not isinstance(key, str) or not NAME_PATTERN.fullmatch(key):
            section.fail(str(key), "relationship names must match [a-z][a-z0-9_]{0,31}")
        r = section.section(key)
        low = r.integer("min", -VALUE_LIMIT, VALUE_LIMIT, -100)
        high = r.integer("max", -VALUE_LIMIT, VALUE_LIMIT, 100)
        if low >= high:
            r.fail("max", f"{high} must be above min ({low})")
        start = r.integer("start", low, high, max(low, min(high, 0)))
        raw = r._list("tiers")
        if not raw:
            r.fail("tiers", "needs at least one tier ({from: <value>, name: <word>, text: <a line for the prompt>})")
        if len(raw) > MAX_TIERS:
            r.fail("tiers", f"has {len(raw)} tiers; the limit is {MAX_TIERS}")
        tiers: list[Tier] = []
        for i, value in enumerate(raw):
            t = _Fields(f.path, value, f"{r.prefix}tiers[{i}].")
            begin = t.integer("from", low, high, low)
            if tiers and begin <= tiers[-1].start:
                t.fail("from", f"{begin} must be above the tier before ({tiers[-1].start}): tiers go up")
            if not tiers and begin != low:
                t.fail("from", f"the first tier must start at min ({low}), got {begin}")
            name = t.text("name", max_len=32)
            if not NAME_PATTERN.fullmatch(name):
                t.fail("name", f"must match [a-z][a-z0-9_]{{0,31}}, got {_show(name)}")
            text = t.text("text", max_len=MAX_TIER_TEXT)
            if plain_text_problem(text):
                t.fail("text", f"{plain_text_problem(text)}: {_show(text)}")
            t.done()
            tiers.append(Tier(begin, name, text))
        r.done()
        specs.append(RelationshipSpec(key, low, high, start, tuple(tiers)))
    names = {s.name for s in specs}
    for i, action in enumerate(actions):  # an effect named after a relationship must say by how much
        for key, value in action.effects:
            if key in names and not EFFECT_PATTERN.fullmatch(value):
                f.fail(f"actions[{i}].effects.{key}", f"changes the relationship {key!r}: must be +N or -N "
                                                      f"(e.g. \"+5\"), got {_show(value)}")
    return tuple(specs)


def _argument(section: _Fields, key: object) -> Argument:
    if not isinstance(key, str) or not NAME_PATTERN.fullmatch(key):
        section.fail(str(key), "argument names must match [a-z][a-z0-9_]{0,31}")
    g = section.section(key)
    kind = g.text("type", max_len=20)
    if kind not in ARGUMENT_TYPES:
        g.fail("type", f"must be one of {', '.join(ARGUMENT_TYPES)}, got {_show(kind)}")
    if kind == "enum":
        values = g.text_list("values", max_len=MAX_VALUE_CHARS)
        source = g.text("from", required=False, max_len=32)
        if values and source:
            g.fail("from", "an enum takes `values` or `from`, not both")
        if not values and not source:
            g.fail(None, "an enum needs `values` (a non-empty list) or `from` (the name of a request entity list)")
        if source and not NAME_PATTERN.fullmatch(source):
            g.fail("from", f"must be an entity list name [a-z][a-z0-9_]{{0,31}}, got {_show(source)}")
        if len(values) > MAX_ENUM_VALUES:
            g.fail("values", f"has {len(values)} values; the limit is {MAX_ENUM_VALUES}")
        for i, v in enumerate(values):
            if plain_text_problem(v):
                g.fail(f"values[{i}]", f"{plain_text_problem(v)}: {_show(v)}")
        if len(set(values)) != len(values):
            g.fail("values", "holds a value twice")
        g.done()
        return Argument(key, kind, values=values, values_from=source)
    if kind == "integer":
        for bound in ("min", "max"):
            if bound not in g.data:
                g.fail(bound, "missing; an integer argument needs min and max")
        low = g.integer("min", -(2**53), 2**53, 0)
        high = g.integer("max", -(2**53), 2**53, 0)
        if low > high:
            g.fail("max", f"{high} is below min ({low})")
        g.done()
        return Argument(key, kind, min=low, max=high)
    max_chars = g.integer("max_chars", 1, 64, 32) if kind == "string" else 32
    g.done()
    return Argument(key, kind, max_chars=max_chars)


def character_folders(root: Path) -> dict[str, Path]:
    """The entries of `root` that are character folders, by name, sorted: not hidden, a folder (or a link
    to one: load_character refuses one leading outside `root`), holding a character.yaml. lexists: a
    character.yaml that is a broken link, a FIFO or a folder is listed, so that it is reported, not hidden.
    Raises OSError when `root` cannot be listed."""
    with os.scandir(root) as entries:
        found = [(e.name, Path(e.path)) for e in entries
                 if not e.name.startswith(".") and e.is_dir() and os.path.lexists(os.path.join(e.path, CHARACTER_FILE))]
    return dict(sorted(found))


def adapter_files(character: Character) -> tuple[Path, ...]:
    """The files whose bytes go into the character's version (for cheap change detection)."""
    if character.adapter_path is None:
        return ()
    return tuple(character.adapter_path / name for name in ADAPTER_FILES)


def _real(path: Path) -> Path:
    """The path with every symbolic link resolved. Unlike Path.resolve() on Python 3.11, a link loop
    is not a RuntimeError: the loop's path comes back, and it is then not a readable file or folder."""
    return Path(os.path.realpath(path))


def _resolve_adapter(path: Path, home: Path, adapter: str) -> Path:
    def fail(problem: str):
        raise CharacterError(path, "adapter", problem)

    if any(ord(c) < 32 for c in adapter):  # a NUL byte makes every os call raise ValueError
        fail(f"must be a folder name, got {_show(adapter)} (it holds control characters)")
    if Path(adapter).is_absolute():
        fail(f"must be a folder relative to the character folder, got {adapter!r}")
    target = _real(home / adapter)
    if not target.is_relative_to(home):
        how = "through a symbolic link " if ".." not in Path(adapter).parts else ""
        fail(f"{adapter!r} leads {how}outside the character folder (to {target})")
    if not os.path.isdir(target):  # (os.path, not Path: a name too long for the OS is just "not found")
        fail(f"folder {adapter!r} not found")
    if not os.path.isfile(target / ADAPTER_FILES[0]):
        fail(f"{adapter!r} has no {ADAPTER_FILES[0]} (a PEFT LoRA folder holds adapter_config.json "
             "and adapter_model.safetensors)")
    for name, limit in ADAPTER_FILE_LIMITS.items():
        file = target / name
        if not os.path.lexists(file):
            continue  # missing weights: the adapter check names them
        real = _real(file)
        if not real.is_relative_to(home):
            fail(f"{adapter}/{name} is a link outside the character folder")
        if not os.path.isfile(real):
            fail(f"{adapter}/{name} is not a regular file")
        size = os.path.getsize(real)
        if size > limit:
            fail(f"{adapter}/{name} is {size} bytes; the limit is {limit}")
    return target


def _hash_files(path: Path, folder: Path) -> bytes:
    """The adapter's version digest, streamed (the files may be 2 GiB; the loader reads them whole)."""
    digests: dict[str, bytes | None] = {}
    for name in ADAPTER_FILES:
        try:
            with (folder / name).open("rb") as f:
                digests[name] = hashlib.file_digest(f, "sha256").digest()
        except FileNotFoundError:
            digests[name] = None
        except OSError as e:
            raise CharacterError(path, "adapter", f"cannot read {folder / name}: {e.strerror or e}") from None
    return adapter_digest(digests)


def _show(value: Any) -> str:
    """A value as a designer would recognise it in an error message."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and value.bit_length() > 64:  # repr() of a 5000-digit int raises ValueError
        return f"a number of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _knowledge(f: _Fields) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """`knowledge:` entries: a line of text, or {text: ..., asked_as: [questions a player would ask for it]}."""
    texts, asked = [], []
    for i, value in enumerate(f._list("knowledge")):
        if isinstance(value, dict):
            item = _Fields(f.path, value, f"{f.prefix}knowledge[{i}].")
            texts.append(item.text("text"))
            asked.append(item.text_list("asked_as", max_len=1000))
            item.done()
        else:
            texts.append(f.list_item_text(f"knowledge[{i}]", value, also=" or {text: ..., asked_as: [...]}"))
            asked.append(())
    return tuple(texts), tuple(asked) if any(asked) else ()


class _Fields:
    """Takes fields out of one mapping; whatever is left at `done()` is an unknown key."""

    def __init__(self, path: Path, data: Any, prefix: str = ""):
        self.path, self.prefix = path, prefix
        if data is None and not prefix:
            self.fail(None, "the file is empty; it needs at least id, name and persona")
        if not isinstance(data, dict):
            what = "must be a mapping of fields" if prefix else "the file must be a mapping of fields (id: ...)"
            self.fail(None, f"{what}, got {_show(data)}")
        self.data = data
        self._seen: set[Any] = set()

    def fail(self, key: str | None, problem: str):
        field_name = f"{self.prefix}{key}" if key else (self.prefix.rstrip(".") or None)
        raise CharacterError(self.path, field_name, problem)

    def _take(self, key: str) -> Any:
        self._seen.add(key)
        return self.data.get(key)

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self._seen]
        if unknown:
            known = ", ".join(sorted(self._seen))
            self.fail(str(unknown[0]), f"unknown field (known fields here: {known})")

    def text(self, key: str, required: bool = True, max_len: int = MAX_TEXT) -> str:
        value = self._take(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                self.fail(key, "missing; it is required" if value is None else "must not be empty")
            return ""
        if not isinstance(value, str):
            hint = " (put it in quotes)" if isinstance(value, bool | int | float) else ""
            self.fail(key, f"must be a string, got {_show(value)}{hint}")
        if len(value) > max_len:
            self.fail(key, f"is {len(value)} characters long; the limit is {max_len}")
        return value.strip()

    def text_list(self, key: str, max_len: int = MAX_TEXT) -> tuple[str, ...]:
        return tuple(self.list_item_text(f"{key}[{i}]", value, max_len) for i, value in enumerate(self._list(key)))

    def list_item_text(self, where: str, value: Any, max_len: int = MAX_TEXT, also: str = "") -> str:
        """One text entry of a list, stripped; `also` names the other form the entry may take."""
        if not isinstance(value, str) or not value.strip():
            self.fail(where, f"must be a non-empty string{also}, got {_show(value)}")
        if len(value) > max_len:
            self.fail(where, f"is {len(value)} characters long; the limit is {max_len}")
        return value.strip()

    def name_set(self, key: str) -> frozenset[str]:
        names = self.text_list(key, max_len=64)
        for i, name in enumerate(names):
            if not ID_PATTERN.fullmatch(name):
                self.fail(f"{key}[{i}]", f"must be a name of [a-z0-9_-] (1-64 characters), got {_show(name)}")
        return frozenset(names)

    def mapping_list(self, key: str, fields: tuple[str, ...]) -> list[dict[str, str]]:
        out = []
        for i, value in enumerate(self._list(key)):
            item = _Fields(self.path, value, f"{self.prefix}{key}[{i}].")
            out.append({name: item.text(name) for name in fields})
            item.done()
        return out

    def _list(self, key: str) -> list[Any]:
        value = self._take(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(key, f"must be a list (lines starting with '- '), got {_show(value)}")
        if len(value) > MAX_ITEMS:
            self.fail(key, f"has {len(value)} entries; the limit is {MAX_ITEMS}")
        return value

    def section(self, key: str) -> _Fields:
        value = self._take(key)
        return _Fields(self.path, {} if value is None else value, f"{self.prefix}{key}.")

    def integer(self, key: str, low: int, high: int, default: int) -> int:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(key, f"must be a whole number between {low} and {high}, got {_show(value)}")
        return value

    def number(self, key: str, low: float, high: float, default: float, low_open: bool = False) -> float:
        value = self._take(key)
        if value is None:
            return default
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not (low < value if low_open else low <= value) or value > high:
            bounds = f"above {low:g} and at most {high:g}" if low_open else f"between {low:g} and {high:g}"
            self.fail(key, f"must be a number {bounds}, got {_show(value)}")
        return float(value)
