"""character.yaml loading: a valid file, and every kind of bad file with an error naming file + field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from sidecar.dialogue.characters import CharacterError, Generation, load_character
from sidecar.errors import UserError

REPO = Path(__file__).resolve().parent.parent

VALID = """\
id: elf
name: Elara
persona: |
  You are Elara, an elf archer.
greeting: Well met.
knowledge:
  - The forest is old.
  - Arrows cost 1 silver.
emotions: [calm, wary]
style_examples:
  - player: Hello
    npc: Greetings, traveller.
generation:
  max_tokens: 64
  temperature: 0.5
  min_p: 0.1
memory:
  max_turns: 3
"""


def write(root: Path, text: str, folder: str = "elf") -> Path:
    home = root / folder
    home.mkdir(parents=True, exist_ok=True)
    (home / "character.yaml").write_text(text)
    return home


def make_adapter(folder: Path, weights: bytes = b"weights") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def error_of(home: Path) -> CharacterError:
    with pytest.raises(CharacterError) as info:
        load_character(home)
    assert isinstance(info.value, UserError)
    assert str(home / "character.yaml") in str(info.value)  # the message names the file
    return info.value


def test_valid_character(tmp_path):
    c = load_character(write(tmp_path, VALID))
    assert (c.id, c.name, c.greeting) == ("elf", "Elara", "Well met.")
    assert c.persona == "You are Elara, an elf archer."
    assert c.knowledge == ("The forest is old.", "Arrows cost 1 silver.") and c.asked_as == ()
    assert c.emotions == ("calm", "wary")
    assert c.style_examples[0].player == "Hello" and c.style_examples[0].npc == "Greetings, traveller."
    assert c.generation == Generation(max_tokens=64, temperature=0.5, top_p=Generation.top_p, min_p=0.1)
    assert c.memory.max_turns == 3
    assert c.adapter_path is None and not c.has_adapter and c.adapter_version is None
    assert len(c.version) == 12


def test_minimal_character_gets_defaults(tmp_path):
    c = load_character(write(tmp_path, "id: elf\nname: Elara\npersona: You are Elara.\ngreeting:\n"))
    assert c.greeting == "" and c.knowledge == () and c.style_examples == ()
    assert c.generation == Generation() and c.lora_scale == 1.0


@pytest.mark.parametrize("folder", ["blacksmith", "oracle", "elara", "quartermaster"])
def test_sample_characters_load(folder, checkpoint):
    from sidecar.model.lora import load_peft_adapter

    c = load_character(REPO / "characters" / folder)
    assert c.id == folder and c.persona and c.greeting and 8 <= len(c.knowledge) <= 12 and c.emotions
    assert 2 <= len(c.actions) <= 4  # things a game can execute, fitting the character
    assert c.places  # which scoped lore reaches it (characters/lore)
    assert (REPO / "characters" / folder / "facts.jsonl").is_file()  # npc eval's fact accuracy
    assert c.generation.max_tokens <= 128 and c.has_adapter
    adapter = load_peft_adapter(c.adapter_path, checkpoint.config)  # fits the embedded model
    assert adapter.rank == 8 and len(adapter.target_modules) == 7
    size = sum(f.stat().st_size for f in c.adapter_path.iterdir())
    assert size <= 5_000_000  # sample adapters stay small enough to commit


def test_actions_are_read_with_their_typed_arguments(tmp_path):
    home = write(tmp_path, VALID + """\
actions:
  - name: sell_item
    description: Sell an arrow bundle.
    arguments:
      item: {type: enum, from: stock}
      count: {type: integer, min: 1, max: 20}
      note: {type: string, max_chars: 12}
      gift: {type: boolean}
      fletching: {type: enum, values: [goose, owl]}
    effects: {gold: "+price"}
""")
    [spec] = load_character(home).actions
    assert spec.name == "sell_item" and spec.effects == (("gold", "+price"),)
    assert [(a.name, a.type) for a in spec.arguments] == [("item", "enum"), ("count", "integer"), ("note", "string"),
                                                         ("gift", "boolean"), ("fletching", "enum")]
    item, count, note, _, fletching = spec.arguments
    assert (item.values_from, count.min, count.max, note.max_chars, fletching.values) == (
        "stock", 1, 20, 12, ("goose", "owl"))


def test_any_change_gives_a_new_version(tmp_path):
    home = write(tmp_path, VALID)
    v1 = load_character(home).version
    assert load_character(home).version == v1  # deterministic
    write(tmp_path, VALID.replace("elf archer", "elf ranger"))
    assert load_character(home).version != v1


_BASE = "id: elf\nname: Elara\npersona: x\n"


@pytest.mark.parametrize("text, field, words", [
    ("id: elf\nname: [x\n", None, "invalid YAML: while parsing a flow sequence at line 2"),
    ("", None, "empty"),
    ("- just\n- a list\n", None, "mapping"),
    ("name: Elara\npersona: x\n", "id", "missing"),
    ("id: Elf!\nname: Elara\npersona: x\n", "id", "[a-z0-9_-]"),
    ("id: orc\nname: Elara\npersona: x\n", "id", "folder name 'elf'"),
    ("id: elf\nname: 42\npersona: x\n", "name", "must be a string, got 42 (put it in quotes)"),
    ("id: elf\nname: Elara\npersona: '  '\n", "persona", "must not be empty"),
    ("id: elf\nname: Elara\npersona: x\nmood: sad\n", "mood", "unknown field"),
    ("id: elf\nname: Elara\npersona: x\nknowledge: The forest is old.\n", "knowledge", "must be a list"),
    ("id: elf\nname: Elara\npersona: x\nknowledge: [ok, 3]\n", "knowledge[1]", "non-empty string or {text"),
    ("id: elf\nname: Elara\npersona: x\nknowledge: [{asked_as: [hi]}]\n", "knowledge[0].text", "missing"),
    ("id: elf\nname: Elara\npersona: x\nknowledge: [{text: a, asked_as: hi}]\n", "knowledge[0].asked_as",
     "must be a list"),
    ("id: elf\nname: Elara\npersona: x\nknowledge: [{text: a, asked_as: ['']}]\n", "knowledge[0].asked_as[0]",
     "non-empty string"),
    ("id: elf\nname: Elara\npersona: x\nknowledge: [{text: a, asks: [hi]}]\n", "knowledge[0].asks",
     "unknown field"),
    ("id: elf\nname: Elara\npersona: x\nemotions: [{a: b}]\n", "emotions[0]", "got a mapping"),
    ("id: elf\nname: Elara\npersona: x\ngeneration:\n  temperature: hot\n", "generation.temperature",
     "must be a number between 0 and 2, got 'hot'"),
    ("id: elf\nname: Elara\npersona: x\ngeneration:\n  temperature: 3\n", "generation.temperature", "got 3"),
    ("id: elf\nname: Elara\npersona: x\ngeneration:\n  top_p: 0\n", "generation.top_p", "above 0"),
    ("id: elf\nname: Elara\npersona: x\ngeneration:\n  min_p: 1.5\n", "generation.min_p", "got 1.5"),
    ("id: elf\nname: Elara\npersona: x\ngeneration:\n  min_p: -0.1\n", "generation.min_p", "got -0.1"),
    ("id: elf\nname: Elara\npersona: x\ngeneration:\n  max_tokens: 1.5\n", "generation.max_tokens", "whole number"),
    ("id: elf\nname: Elara\npersona: x\ngeneration:\n  max_tokens: true\n", "generation.max_tokens", "got True"),
    ("id: elf\nname: Elara\npersona: x\ngeneration:\n  seed: 1\n", "generation.seed", "unknown field"),
    ("id: elf\nname: Elara\npersona: x\ngeneration: fast\n", "generation", "must be a mapping"),
    ("id: elf\nname: Elara\npersona: x\nmemory:\n  max_turns: -1\n", "memory.max_turns", "between 0 and 1000"),
    ("id: elf\nname: Elara\npersona: x\nstyle_examples:\n  - player: hi\n", "style_examples[0].npc", "missing"),
    ("id: elf\nname: Elara\npersona: x\nstyle_examples:\n  - {player: hi, npc: yo, mood: x}\n",
     "style_examples[0].mood", "unknown field"),
    ("id: elf\nname: Elara\npersona: x\nlora_scale: 0.5\n", "lora_scale", "no adapter"),
    ("id: elf\nname: Elara\npersona: x\nadapter: 7\n", "adapter", "must be a string"),
    ("id: elf\nname: Elara\npersona: x\nknowledge: [a]\nknowledge: [b]\n", "knowledge", "appears twice"),
    ("id: elf\nname: Elara\npersona: x\ngeneration: {top_p: 0.5, top_p: 0.6}\n", "generation.top_p", "twice"),
    ("id: elf\nname: &n Elara\npersona: *n\n", "persona", "aliases"),
    ("id: elf\nname: Elara\npersona: !!python/object:os.system x\n", None, "invalid YAML"),
    # emotions the model writes in brackets, and actions
    (f"{_BASE}emotions: ['[x]']\n", "emotions[0]", "without brackets"),
    (f"{_BASE}emotions: [calm, calm]\n", "emotions", "twice"),
    (f"{_BASE}actions: sell\n", "actions", "must be a list"),
    (f"{_BASE}actions:\n  - description: Sell.\n", "actions[0].name", "missing"),
    (f"{_BASE}actions:\n  - {{name: Sell Item, description: x}}\n", "actions[0].name", "[a-z][a-z0-9_]"),
    (f"{_BASE}actions:\n  - {{name: sell}}\n", "actions[0].description", "missing"),
    (f"{_BASE}actions:\n  - {{name: sell, description: x}}\n  - {{name: sell, description: y}}\n",
     "actions[1].name", "declared twice"),
    (f"{_BASE}actions:\n  - {{name: sell, description: x, cost: 3}}\n", "actions[0].cost", "unknown field"),
    (f"{_BASE}actions:\n  - {{name: sell, description: x, arguments: [item]}}\n", "actions[0].arguments",
     "must be a mapping"),
    (f"{_BASE}actions:\n  - {{name: sell, description: x, arguments: {{item: {{type: thing}}}}}}\n",
     "actions[0].arguments.item.type", "enum, integer, string, boolean"),
    (f"{_BASE}actions:\n  - {{name: sell, description: x, arguments: {{item: {{type: enum}}}}}}\n",
     "actions[0].arguments.item", "needs `values`"),
    (f"{_BASE}actions:\n  - {{name: sell, description: x, arguments: {{item: {{type: enum, values: []}}}}}}\n",
     "actions[0].arguments.item", "needs `values`"),
    (f"{_BASE}actions:\n  - {{name: sell, description: x, arguments: {{item: {{type: enum, values: [a], "
     f"from: stock}}}}}}\n", "actions[0].arguments.item.from", "not both"),
    (f"{_BASE}actions:\n  - {{name: sell, description: x, arguments: {{item: {{type: enum, values: [a, a]}}}}}}\n",
     "actions[0].arguments.item.values", "twice"),
    (f"{_BASE}actions:\n  - {{name: sell, description: x, arguments: {{n: {{type: integer, min: 1}}}}}}\n",
     "actions[0].arguments.n.max", "missing"),
    (f"{_BASE}actions:\n  - {{name: sell, description: x, arguments: {{n: {{type: integer, min: 5, max: 1}}}}}}\n",
     "actions[0].arguments.n.max", "below min"),
    (f"{_BASE}actions:\n  - {{name: sell, description: x, arguments: {{s: {{type: string, max_chars: 500}}}}}}\n",
     "actions[0].arguments.s.max_chars", "between 1 and 64"),
    (f"{_BASE}actions:\n  - {{name: sell, description: x, arguments: {{Bad: {{type: boolean}}}}}}\n",
     "actions[0].arguments.Bad", "argument names"),
    # lore scopes and relationships
    (f"{_BASE}factions: [Sea Dogs]\n", "factions[0]", "[a-z0-9_-]"),
    (f"{_BASE}places: harbour\n", "places", "must be a list"),
    (f"{_BASE}relationships: [trust]\n", "relationships", "must be a mapping"),
    (f"{_BASE}relationships:\n  Trust: {{tiers: [{{from: -100, name: a, text: x}}]}}\n", "relationships.Trust",
     "relationship names"),
    (f"{_BASE}relationships:\n  trust: {{min: 5, max: 5, tiers: [{{from: 5, name: a, text: x}}]}}\n",
     "relationships.trust.max", "must be above min"),
    (f"{_BASE}relationships:\n  trust: {{start: 200, tiers: [{{from: -100, name: a, text: x}}]}}\n",
     "relationships.trust.start", "between -100 and 100, got 200"),
    (f"{_BASE}relationships:\n  trust: {{}}\n", "relationships.trust.tiers", "at least one tier"),
    (f"{_BASE}relationships:\n  trust: {{tiers: [{{from: 0, name: a, text: x}}]}}\n",
     "relationships.trust.tiers[0].from", "must start at min (-100)"),
    (f"{_BASE}relationships:\n  trust: {{tiers: [{{from: -100, name: a, text: x}}, {{from: -100, name: b, "
     f"text: y}}]}}\n", "relationships.trust.tiers[1].from", "tiers go up"),
    (f"{_BASE}relationships:\n  trust: {{tiers: [{{from: -100, name: a}}]}}\n", "relationships.trust.tiers[0].text",
     "missing"),
    (f"{_BASE}relationships:\n  trust: {{tiers: [{{from: -100, name: a, text: x, mood: y}}]}}\n",
     "relationships.trust.tiers[0].mood", "unknown field"),
    (f"{_BASE}relationships:\n  trust: {{tiers: [{{from: -100, name: a, text: x}}]}}\nactions:\n"
     f"  - {{name: gift, description: x, effects: {{trust: lots}}}}\n", "actions[0].effects.trust", "+N or -N"),
])
def test_bad_file_names_file_and_field(tmp_path, text, field, words):
    err = error_of(write(tmp_path, text))
    assert err.field == field
    if field:
        assert f"character.yaml: {field}: " in str(err)
    assert words in str(err), str(err)


def test_not_utf8(tmp_path):
    home = tmp_path / "elf"
    home.mkdir()
    (home / "character.yaml").write_bytes(b"id: elf\nname: \xff\xfe\n")
    assert "UTF-8" in str(error_of(home))


def test_file_size_is_capped_before_parsing(tmp_path):
    home = write(tmp_path, "id: elf\nname: Elara\npersona: x\n# " + "x" * (1 << 20) + "\n")
    assert "limit" in str(error_of(home))


def test_billion_laughs_is_rejected_before_anything_expands(tmp_path, monkeypatch):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    text = "\n".join(lines) + "\nid: elf\nname: Elara\npersona: *a9\n"
    home = write(tmp_path, text)
    # Work, not time: count the parser events read (an alias is one event; expanded, *a9 is 9^10 strings), and
    # make the loader, which builds what the aliases point to, fail the test if it runs.
    events, parse = [], yaml.parse
    in_file = sum(1 for _ in parse(text))

    def counted(*args, **kwargs):
        for event in parse(*args, **kwargs):
            events.append(event)
            yield event

    monkeypatch.setattr(yaml, "parse", counted)
    monkeypatch.setattr(yaml, "load", lambda *args, **kwargs: pytest.fail("the loader ran on aliases"))
    err = error_of(home)
    assert "aliases" in str(err) and err.field == "a1[0]"
    assert 0 < len(events) <= in_file  # at most one pass over the file's own events


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deep_nesting_is_rejected(tmp_path, depth):
    # (safe_load's composer recurses per level; libyaml's scanner also stops at 1000 on its own)
    home = write(tmp_path, "id: elf\nname: Elara\npersona: x\nknowledge: " + "[" * depth + "]" * depth + "\n")
    assert "nest" in str(error_of(home))


# --- adapters -----------------------------------------------------------------------------

BASE = "id: elf\nname: Elara\npersona: You are Elara.\n"


def test_adapter_inside_folder(tmp_path):
    home = write(tmp_path, BASE + "adapter: adapter\nlora_scale: 0.5\n")
    make_adapter(home / "adapter")
    c = load_character(home)
    assert c.adapter_path == (home / "adapter").resolve() and c.adapter_path.is_absolute()
    assert c.has_adapter and c.lora_scale == 0.5 and len(c.adapter_version) == 12


def test_adapter_files_change_the_version(tmp_path):
    home = write(tmp_path, BASE + "adapter: adapter\n")
    make_adapter(home / "adapter", b"one")
    first = load_character(home)
    make_adapter(home / "adapter", b"two")
    second = load_character(home)
    assert second.version != first.version and second.adapter_version != first.adapter_version
    write(tmp_path, BASE.replace("Elara.", "Elara the brave.") + "adapter: adapter\n")
    third = load_character(home)
    assert third.version != second.version and third.adapter_version == second.adapter_version


def test_adapter_escaping_with_dotdot(tmp_path):
    make_adapter(tmp_path / "other")
    err = error_of(write(tmp_path, BASE + "adapter: ../other\n"))
    assert err.field == "adapter" and "outside the character folder" in str(err)


def test_adapter_absolute_path(tmp_path):
    make_adapter(tmp_path / "other")
    err = error_of(write(tmp_path, BASE + f"adapter: {tmp_path / 'other'}\n"))
    assert err.field == "adapter" and "relative" in str(err)


def test_adapter_escaping_through_symlink(tmp_path):
    home = write(tmp_path, BASE + "adapter: adapter\n")
    os.symlink(make_adapter(tmp_path / "elsewhere"), home / "adapter")
    err = error_of(home)
    assert err.field == "adapter" and "symbolic link" in str(err)


def test_adapter_file_symlinked_outside(tmp_path):
    home = write(tmp_path, BASE + "adapter: adapter\n")
    make_adapter(home / "adapter")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    (home / "adapter" / "adapter_model.safetensors").unlink()
    os.symlink(secret, home / "adapter" / "adapter_model.safetensors")
    assert "link outside" in str(error_of(home))


def test_symlink_inside_folder_is_fine(tmp_path):
    home = write(tmp_path, BASE + "adapter: current\n")
    make_adapter(home / "v2")
    os.symlink(home / "v2", home / "current")
    assert load_character(home).adapter_path == (home / "v2").resolve()


def test_adapter_without_config(tmp_path):
    home = write(tmp_path, BASE + "adapter: adapter\n")
    (home / "adapter").mkdir()
    (home / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    err = error_of(home)
    assert err.field == "adapter" and "adapter_config.json" in str(err)


def test_adapter_folder_missing(tmp_path):
    err = error_of(write(tmp_path, BASE + "adapter: adapter\n"))
    assert err.field == "adapter" and "not found" in str(err)
