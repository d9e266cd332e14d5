"""World lore (characters/lore): scopes, bad files, hot reload, retrieval, and the promise that an entry out
of a character's scope never reaches its prompt (200 adversarial turns through Dialogue.talk, prompts read back)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from pathlib import Path

import pytest

from sidecar.config import RequestLimits
from sidecar.dialogue.characters import load_character
from sidecar.dialogue.lore import LoreError, LoreLibrary, read_lore_file, read_world
from sidecar.dialogue.registry import CharacterRegistry
from sidecar.dialogue.retrieval import FactRetriever, Grounding
from sidecar.dialogue.sessions import SessionStore, Turn
from sidecar.dialogue.turn import Dialogue, TalkInput
from tests.recording_engine import RecordingEngine
from tests.sidecar_process import REPO

SAMPLES = ("blacksmith", "elara", "oracle", "quartermaster")


def _world(root: Path, factions=("crew", "guild"), places=("harbour", "forest")) -> Path:
    lore = root / "lore"
    lore.mkdir(parents=True, exist_ok=True)
    (lore / "world.yaml").write_text(f"factions: [{', '.join(factions)}]\nplaces: [{', '.join(places)}]\n")
    return lore


def _character(cid: str, factions=(), places=()):
    c = load_character(REPO / "characters" / "blacksmith")
    from dataclasses import replace
    return replace(c, id=cid, factions=frozenset(factions), places=frozenset(places))


def test_scopes_admit_by_faction_place_or_name(tmp_path):
    lore = _world(tmp_path)
    (lore / "mixed.yaml").write_text(
        "scope: {places: [harbour]}\n"
        "entries:\n"
        "  - The tide turns at dusk.\n"
        "  - text: The captain hides the key in his boot.\n"
        "    scope: {factions: [crew], characters: [oracle]}\n"
        "  - text: Bread costs a copper.\n"
        "    scope: everyone\n")
    entries = read_lore_file(lore / "mixed.yaml", read_world(lore / "world.yaml"))
    tide, key, bread = entries
    sailor, landlubber, seer = _character("sailor", ["crew"]), _character("farmer", [], ["forest"]), \
        _character("oracle")
    docker = _character("docker", [], ["harbour"])
    assert [tide.scope.admits(c) for c in (sailor, landlubber, seer, docker)] == [False, False, False, True]
    assert [key.scope.admits(c) for c in (sailor, landlubber, seer, docker)] == [True, False, True, False]
    assert all(bread.scope.admits(c) for c in (sailor, landlubber, seer, docker))
    assert key.source == "mixed.yaml#1"


@pytest.mark.parametrize("content, field, problem", [
    ("scope: {factions: [pirates]}\nentries: [x]\n", "scope.factions", "unknown faction 'pirates': declare it in"),
    ("scope: {places: [moon]}\nentries: [x]\n", "scope.places", "unknown place 'moon'"),
    ("scope: {guilds: [crew]}\nentries: [x]\n", "scope.guilds", "unknown scope kind"),
    ("scope: nobody\nentries: [x]\n", "scope", "must be `everyone` or a mapping"),
    ("scope: {characters: []}\nentries: [x]\n", "scope", "names nobody"),
    ("scope: {characters: [Bad Name]}\nentries: [x]\n", "scope.characters[0]", "must be a name of [a-z0-9_-]"),
    ("entries: ['" + "word " * 200 + "']\n", "entries[0]", "characters long; the limit is 400"),
    ("entries: [3]\n", "entries[0]", "must be a non-empty string"),
    ("entries:\n  - text: ''\n", "entries[0].text", "must be a non-empty string"),
    ('entries: ["bell\\x07"]\n', "entries[0]", "control characters"),
    ("entries:\n  - text: a\n    weight: 3\n", "entries[0].weight", "unknown field"),
    ("entries: {a: b}\n", "entries", "must be a list"),
    ("facts: [a]\n", "facts", "unknown field"),
    ("- just a list\n", None, "must be a mapping with `entries`"),
    ("entries: [a, [b\n", None, ""),  # not YAML
])
def test_bad_lore_files_name_the_file_and_field(tmp_path, content, field, problem):
    lore = _world(tmp_path)
    (lore / "bad.yaml").write_text(content)
    with pytest.raises(LoreError) as e:
        read_lore_file(lore / "bad.yaml", read_world(lore / "world.yaml"))
    assert str(lore / "bad.yaml") in str(e.value) and problem in str(e.value)
    if field:
        assert e.value.field == field


def test_a_broken_edit_keeps_the_last_good_file_and_harms_no_other(tmp_path):
    lore = _world(tmp_path)
    (lore / "a.yaml").write_text("entries: [The tide turns at dusk.]\n")
    (lore / "b.yaml").write_text("entries: [Bread costs a copper.]\n")
    library = LoreLibrary(lore)
    assert library.reload() and [e.text for e in library.snapshot().entries] == [
        "The tide turns at dusk.", "Bread costs a copper."]
    assert not library.reload()  # nothing changed, nothing rebuilt
    (lore / "a.yaml").write_text("scope: {factions: [pirates]}\nentries: [The tide turns at noon.]\n")
    assert library.reload()
    snapshot = library.snapshot()
    assert [e.text for e in snapshot.entries] == ["The tide turns at dusk.", "Bread costs a copper."]
    status = {f.name: f for f in snapshot.files}
    assert "unknown faction 'pirates'" in status["a.yaml"].error and status["a.yaml"].entries == 1
    assert status["b.yaml"].error == ""
    (lore / "a.yaml").write_text("scope: {factions: [crew]}\nentries: [The tide turns at noon.]\n")
    assert library.reload()
    assert library.snapshot().entries[0].text == "The tide turns at noon." and not library.snapshot().files[0].error
    (lore / "a.yaml").unlink()
    assert library.reload() and [e.text for e in library.snapshot().entries] == ["Bread costs a copper."]


def test_a_world_file_edit_revalidates_the_entries(tmp_path):
    lore = _world(tmp_path)
    (lore / "ship.yaml").write_text("scope: {factions: [crew]}\nentries: [The hold is full.]\n")
    library = LoreLibrary(lore)
    library.reload()
    _world(tmp_path, factions=("guild",))  # the faction the file names is gone
    assert library.reload()
    assert "unknown faction 'crew'" in library.snapshot().files[0].error
    assert library.snapshot().entries[0].text == "The hold is full."  # still the last good version


def test_the_characters_watcher_reloads_the_lore(tmp_path):
    root = tmp_path / "characters"
    shutil.copytree(REPO / "characters" / "blacksmith", root / "blacksmith", ignore=shutil.ignore_patterns(
        "adapter", "training"))
    text = (root / "blacksmith" / "character.yaml").read_text()
    (root / "blacksmith" / "character.yaml").write_text(
        "\n".join(x for x in text.splitlines() if not x.startswith("adapter:")))
    lore = _world(root, places=("highmoor",))
    retriever = FactRetriever(LoreLibrary(lore))
    registry = CharacterRegistry(root, also_scan=retriever.reload)
    smith = registry.get("blacksmith")
    line = "Who makes the best pies in town?"
    assert not any("Mabel" in f for f in retriever.facts(smith, line))
    (lore / "town.yaml").write_text("scope: {places: [highmoor]}\nentries: [Old Mabel bakes the best pies in town.]\n")
    registry.reload()  # what the watcher thread runs every reload interval
    assert retriever.facts(smith, line)[0] == "Old Mabel bakes the best pies in town."
    assert retriever.in_scope(smith) == ["Old Mabel bakes the best pies in town."]


def test_retrieval_puts_the_matching_entry_first_within_the_budget(tmp_path):
    lore = _world(tmp_path)
    (lore / "town.yaml").write_text(
        "entries:\n  - The ferry to the islands leaves at dawn.\n  - The miller's daughter is called Wren.\n"
        "  - Horses are stabled behind the chapel.\n")
    smith = load_character(REPO / "characters" / "blacksmith")
    retriever = FactRetriever(LoreLibrary(lore), Grounding(max_facts=3, max_chars=400))
    facts = retriever.facts(smith, "When does the ferry leave?")
    assert facts[0] == "The ferry to the islands leaves at dawn." and len(facts) == 3
    assert "The miller's daughter is called Wren." not in facts  # lore that does not match stays out
    assert set(facts[1:]) <= set(smith.knowledge)  # the rest is the character's own knowledge
    assert sum(map(len, retriever.facts(smith, "ferry", ""))) <= 400
    # The last exchange counts too: a follow-up without the key word still finds the entry.
    followup = retriever.facts(smith, "And when is that?", "Where can I catch the ferry? At the pier, lad.")
    assert followup[0] == "The ferry to the islands leaves at dawn."
    tight = FactRetriever(LoreLibrary(lore), Grounding(max_facts=4, max_chars=60))
    assert sum(map(len, tight.facts(smith, "When does the ferry leave?"))) <= 60


# --- 200 adversarial turns: nothing out of scope in any prompt ------------------------------------------

SECRETS = [  # scoped to one sample character each (or to a faction / place only one of them has)
    ("{characters: [oracle]}", "The crown jewels are buried under the third oak of the royal orchard."),
    ("{characters: [oracle]}", "The queen's ring was forged from dragon gold stolen from Cindermaw."),
    ("{factions: [gilded-gull-crew]}", "The Gull's captain keeps the treasure map sewn inside his coat."),
    ("{factions: [gilded-gull-crew]}", "Smuggled silk is landed at the north cove under a new moon."),
    ("{places: [whisperwood]}", "The wolf pack's den lies beneath the hollow oak near the watchtower."),
    ("{factions: [highmoor-folk]}", "The forge's secret quench uses water from the Moonwell."),
    ("{characters: [elara]}", "Elara's bow was a gift from the hermit Corwin, who was a royal physician."),
]


def test_no_entry_out_of_scope_reaches_any_prompt(tmp_path, tokenizer):
    root = tmp_path / "characters"
    shutil.copytree(REPO / "characters", root, ignore=shutil.ignore_patterns("adapter", "training", "*.jsonl"))
    for cid in SAMPLES:
        path = root / cid / "character.yaml"
        path.write_text("\n".join(x for x in path.read_text().splitlines() if not x.startswith("adapter:")))
    (root / "lore" / "secrets.yaml").write_text("entries:\n" + "".join(
        f"  - text: \"{text}\"\n    scope: {scope}\n" for scope, text in SECRETS))
    registry = CharacterRegistry(root)
    library = LoreLibrary(root / "lore")
    retriever = FactRetriever(library)
    engine = RecordingEngine(tokenizer)
    dialogue = Dialogue(engine, registry, SessionStore(), RequestLimits(), retriever)
    entries = library.snapshot().entries
    assert len(entries) > len(SECRETS) + 10  # the sample world's lore and the secrets above

    # Lines made of the secrets' own words (and the sample lore's), asked of every character, in sessions, so
    # that the last exchange (which also steers retrieval) holds them too.
    words = [e.text for e in entries]
    lines = [f"Tell me: {text}" for text in words] + [f"Is it true that {text.lower()}" for text in words]
    turns = list(itertools.islice(itertools.cycle(itertools.product(SAMPLES, lines)), 0, 240))

    async def run():
        for i, (cid, line) in enumerate(turns):
            talk = TalkInput(cid, f"s-{cid}-{i % 3}", line, world={}, player_name="")
            async for _ in dialogue.talk(talk):
                pass

    asyncio.run(run())
    assert len(engine.prompts) == len(turns) >= 200
    leaked, reached = [], 0
    for (cid, _line), ids in zip(turns, engine.prompts, strict=True):
        character = registry.get(cid)
        block = tokenizer.decode(ids).split("What you know that bears on this:")
        assert len(block) == 2, cid  # every prompt has its facts block
        # (what the player said earlier may come back as memory: the player's words are no leak)
        facts = block[1].split("\nuser\n")[0].split("What you remember")[0]
        for entry in entries:
            if entry.text in facts:
                reached += entry.scope.admits(character)
                if not entry.scope.admits(character):
                    leaked.append((cid, entry.text))
    assert not leaked
    assert reached >= 100  # in-scope lore does reach the prompts: the check above is not vacuous


# --- long-term memory: exchanges that left the window come back when the line refers to them --------------

def test_long_term_memory_brings_back_what_left_the_window(tmp_path, tokenizer):
    root = tmp_path / "characters"
    shutil.copytree(REPO / "characters" / "blacksmith", root / "blacksmith", ignore=shutil.ignore_patterns(
        "adapter", "training", "*.jsonl"))
    path = root / "blacksmith" / "character.yaml"
    path.write_text("\n".join(x for x in path.read_text().splitlines() if not x.startswith("adapter:")))
    registry = CharacterRegistry(root)
    smith = registry.get("blacksmith")
    window = smith.memory.max_turns
    sessions = SessionStore()
    sessions.append_turn("s", Turn("blacksmith", "My horse is called Clover and she threw a shoe.",
                                   "Bring Clover round the back, lad.", emotion="gruff"))
    for i in range(window + 3):  # enough small talk to push the horse out of the prompt's window
        sessions.append_turn("s", Turn("blacksmith", f"Nice weather today, number {i}?", "Hmph.", emotion="gruff"))
    sessions.append_turn("s", Turn("oracle", "What is Clover's fate?", "Clover runs free.", emotion="calm"))
    engine = RecordingEngine(tokenizer)
    dialogue = Dialogue(engine, registry, sessions, RequestLimits(), FactRetriever())

    async def say(session: str, line: str) -> str:
        async for _ in dialogue.talk(TalkInput("blacksmith", session, line, world={}, player_name="")):
            pass
        return tokenizer.decode(engine.prompts[-1])

    remembered = asyncio.run(say("s", "Do you remember my horse Clover?"))
    assert ('What you remember from earlier that bears on this:\n- The player said "My horse is called Clover and '
            'she threw a shoe." and you answered "Bring Clover round the back, lad."') in remembered
    assert "Clover runs free" not in remembered  # another character's exchange is not this one's memory
    assert remembered.count("Nice weather today") == window  # the window itself is unchanged
    # A line that refers to nothing old brings nothing back; a session without old turns has no memory block.
    assert "What you remember" not in asyncio.run(say("s", "How much is a sword?"))
    assert "What you remember" not in asyncio.run(say("fresh", "Do you remember my horse Clover?"))
