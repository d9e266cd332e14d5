"""World lore (characters/lore): scopes, bad files, hot reload, retrieval, and the promise that an entry out
of a character's scope never reaches its prompt (200 adversarial turns through Dialogue.talk, prompts read back)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.config import FACT_CONTRAST, RequestLimits
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


# Questions a player asks in other words than the file's: BM25 alone ranks no knowledge line by them (no
# shared word), so what ranks them is the sentence vectors (dialogue/embeddings.py).
PARAPHRASES = [("where is your workshop?", 1), ("who serves the beer in town?", 2), ("how much for a blade?", 3),
               ("who helps you at the bellows?", 4), ("I'm sick, where can I find a healer?", 5),
               ("is it safe to walk in the forest at night?", 6), ("any children?", 7),
               ("when does the boat sail?", 0), ("got any siblings?", 2), ("where do you work metal?", 1)]
KNOWLEDGE = ("The ferry to the islands leaves at dawn from the east pier.", "Your forge is beside the north gate.",
             "Your brother Torvik runs the tavern.", "A sword costs 40 gold.", "Your apprentice is a boy named Tobin.",
             "The physician Mara lives above the bakery.", "Wolves hunt in the pine woods after dark.",
             "Your daughter Ilsa is a sailor on the Gilded Gull.")


def test_a_question_in_other_words_finds_its_fact():
    smith = replace(load_character(REPO / "characters" / "blacksmith"), knowledge=KNOWLEDGE, asked_as=(),
                    version="paraphrases")
    retriever = FactRetriever(grounding=Grounding(max_facts=3, max_chars=600))
    ranks = []
    for line, answer in PARAPHRASES:
        facts = retriever.facts(smith, line)
        assert KNOWLEDGE[answer] in facts, (line, facts)  # in the block, every one
        ranks.append(facts.index(KNOWLEDGE[answer]))
    assert ranks.count(0) >= 7, ranks  # and first for most (BM25 alone: none of them)
    assert retriever.facts(smith, "Tell me about Tobin.")[0] == KNOWLEDGE[4]  # a name still wins by its word


def test_how_players_ask_for_a_fact_finds_it_and_stays_out_of_the_prompt(tmp_path):
    """`asked_as:` questions under a knowledge line: a player line like one of them (no word or meaning in
    common with the line itself) brings the line first; the questions never enter the block themselves."""
    (tmp_path / "smith").mkdir()
    (tmp_path / "smith" / "character.yaml").write_text(
        "id: smith\nname: Brynja\npersona: A blacksmith.\nknowledge:\n"
        "  - The ferry to the islands leaves at dawn from the east pier.\n"
        "  - text: Your brother Torvik runs the tavern.\n"
        "    asked_as: [got any family in town?, who pours the ale around here?]\n"
        "  - A sword costs 40 gold.\n  - Your apprentice is a boy named Tobin.\n"
        "  - Wolves hunt in the pine woods after dark.\n")
    smith = load_character(tmp_path / "smith")
    assert smith.asked_as[1] == ("got any family in town?", "who pours the ale around here?")
    assert smith.asked_as[0] == smith.asked_as[2] == ()
    plain = replace(smith, asked_as=(), version="plain")
    retriever = FactRetriever(grounding=Grounding(max_facts=3, max_chars=600))
    for line in ("anyone related to you living nearby?", "do you have relatives here?", "where can I get a beer?",
                 "who fills the mugs?"):
        assert retriever.facts(plain, line)[0] != smith.knowledge[1], line  # not found by the line alone...
        facts = retriever.facts(smith, line)
        assert facts[0] == smith.knowledge[1], (line, facts)  # ...found by how players ask for it
        assert not any("family" in f or "ale" in f.split() for f in facts)
    assert retriever.facts(smith, "When does the ferry leave?")[0] == smith.knowledge[0]  # the others unchanged


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

# What a player told the smith, and how they ask about it 55 turns later (small talk between): most share a
# word with what was said, some only its meaning ("afraid" / "scared").
MEMORY_CASES = [
    ("My horse is called Clover and she threw a shoe.", "What was my horse called again?"),
    ("My sister Maren is a weaver in Saltmere.", "Do you remember where my sister works?"),
    ("I lost my grandfather's ring in the river last spring.", "Any luck finding a ring like the one I lost?"),
    ("I'm saving up for a shield with a wolf's head on it.", "Still got that wolf shield I wanted?"),
    ("My name's Aria and I'm from the Isle of Brenn.", "Where did I tell you I was from?"),
    ("I owe the baker three silver for bread.", "Who did I say I owe money to?"),
    ("My old dog Biscuit died last winter.", "I still miss my dog, you know."),
    ("I was a soldier in the king's guard for ten years.", "Did I ever tell you how long I served in the guard?"),
    ("My favourite colour is deep green, like pine.", "What colour did I say I liked?"),
    ("I'm allergic to goat's milk.", "Remember what I can't drink?"),
    ("My brother Fen fell from the cliffs by Hollow Point.", "Do you remember where my brother fell?"),
    ("I keep my savings under a loose stone in the chapel.", "Where did I say I hide my savings?"),
    ("I was born during the great flood of the Vell.", "What happened the year I was born?"),
    ("I'm learning to play the lute from a bard named Osk.", "Who's teaching me the lute?"),
    ("My boots were made by a cobbler in Wrenford.", "Where were my boots made?"),
    ("I saw a white stag near the old watchtower.", "What did I see near the watchtower?"),
    ("My mother sings in the temple choir.", "Where does my mother sing?"),
    ("I carry a dagger my father gave me, with an amber hilt.", "What's special about my father's dagger?"),
    ("I once sailed to the Frostfang islands on a whaler.", "Where did I sail that time?"),
    ("My cousin runs a mill on the Ashwater.", "What does my cousin run?"),
    ("I broke my arm falling off a hay cart as a boy.", "How did I break my arm?"),
    ("I'm scared of spiders since one bit me in a cellar.", "What am I afraid of?"),
    ("My wife Lenna bakes the best plum tarts in the valley.", "Whose tarts did I brag about?"),
    ("I traded my old cloak for a map of the southern hills.", "What did I get for my cloak?"),
    ("My uncle was hanged for stealing a duke's horse.", "What happened to my uncle?"),
    ("I've got a scar on my cheek from a bear in the north woods.", "How did I get this scar?"),
    ("I keep bees on a hill behind my cottage.", "Do you remember what I keep behind my cottage?"),
    ("My daughter Ilsa turns seven at midsummer.", "When's my daughter's birthday?"),
    ("I fished a silver coin with a crowned fox out of the well.", "What was on that coin from the well?"),
    ("I work nights as a lamplighter on Copper Street.", "What's my job again?"),
    ("My best friend Corin joined the smugglers.", "Who joined the smugglers?"),
    ("I buried my grandmother's chest under the apple tree.", "Where did I bury the chest?"),
    ("My first sword was a rusty blade I found in a ditch.", "What was my first sword like?"),
    ("I can't swim; I nearly drowned as a child.", "Why don't I swim?"),
    ("My family grows barley on the east slope.", "What does my family grow?"),
    ("I once won a wrestling match against a troll-blooded man.", "Who did I beat at wrestling?"),
    ("I'm travelling north to find my missing father.", "Why am I going north?"),
    ("My shield was painted by an artist called Vey.", "Who painted my shield?"),
    ("I lost two fingers to frostbite on the Greywind pass.", "Where did I lose my fingers?"),
    ("I sleep in the loft above the stables.", "Where do I sleep?"),
]

SMALL_TALK = ["Nice weather today.", "How's business?", "What's for sale?", "Hot in here, isn't it?",
              "Is the forge busy?", "Any news from town?", "How much is a sword?", "Can you fix my helmet?",
              "What's the price of coal now?", "Who's your apprentice?", "Is the tavern open?", "Do you sell arrows?",
              "Busy day?", "Tell me about Highmoor.", "What do you think of elves?", "Heard any rumours?",
              "Can I watch you work?", "Is the north gate open at night?", "What's the best blade you have?",
              "Do you ever rest?"]


def test_what_the_player_said_55_turns_ago_comes_back_when_asked():
    """Issue 16's memory target: 95% of cases. 38 / 40 here (words only, Grounding(meaning_weight=0): 36). The
    misses share neither a word nor much meaning with what was said: "Where did I tell you I was from?" for
    "I'm from the Isle of Brenn", "What's my job again?" for "I work nights as a lamplighter"."""
    import random

    smith = load_character(REPO / "characters" / "blacksmith")
    retriever, rng = FactRetriever(), random.Random(0)
    recalled = 0
    for said, asked in MEMORY_CASES:
        history = [Turn("blacksmith", said, "Hmph. I'll remember that, lad.")]
        history += [Turn("blacksmith", rng.choice(SMALL_TALK), rng.choice(["Hmph.", "Aye, lad.", "Forty gold."]))
                    for _ in range(55)]
        recalled += any(said in memory for memory in retriever.recall(smith, history, asked))
    assert recalled >= 38, recalled


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


def _sample_characters(tmp_path) -> Path:
    """The sample characters without their adapters (RecordingEngine has no model to check them against)."""
    root = tmp_path / "characters"
    shutil.copytree(REPO / "characters", root, ignore=shutil.ignore_patterns("adapter", "training", "*.jsonl"))
    for path in root.glob("*/character.yaml"):
        path.write_text("\n".join(x for x in path.read_text().splitlines() if not x.startswith("adapter:")))
    return root


def _turn_sampling(root: Path, engine, grounding: Grounding, line: str):
    """The SamplingParams a blacksmith turn on `line` submits under `grounding`."""
    retriever = FactRetriever(LoreLibrary(root / "lore"), grounding)
    dialogue = Dialogue(engine, CharacterRegistry(root), SessionStore(), RequestLimits(), retriever)

    async def run():
        async for _ in dialogue.talk(TalkInput("blacksmith", "", line, world={}, player_name="")):
            pass

    asyncio.run(run())
    return engine.sampling[-1]


def test_a_turn_raises_the_tokens_only_its_facts_bring(tmp_path, tokenizer):
    """prompt.fact_tokens (`npc serve --fact-boost`): the price and the names in the facts block get
    Grounding.fact_boost in the turn's sampling; a word the player or the persona already said does not, nor
    does a control token; off by default."""
    root, engine = _sample_characters(tmp_path), RecordingEngine(tokenizer)
    line = "What does a sword cost here?"
    raised = _turn_sampling(root, engine, Grounding(fact_boost=2.0), line).logit_bias
    prompt = tokenizer.decode(engine.prompts[-1])
    facts = prompt.split("What you know that bears on this:\n")[1].split("\nuser\n")[0]
    assert "A sword costs 40 gold" in facts
    pieces = {tokenizer.decode([token]) for token, _ in raised}
    assert {"4", " Tor", "vik"} <= pieces and {b for _, b in raised} == {2.0}  # 40 gold; Torvik
    assert not {" know", " bears"} & pieces  # the heading is no fact
    assert all(piece in facts for piece in pieces)  # only what the facts say ...
    spoken = set(tokenizer.encode_literal(line)) | tokenizer.special_ids
    assert not spoken & {token for token, _ in raised}  # ... and not what the player said ("sword")
    assert _turn_sampling(root, engine, Grounding(), line).logit_bias == ()


def test_a_turn_decodes_against_its_prompt_without_the_facts(tmp_path, tokenizer):
    """`npc serve --fact-contrast W`: the turn's sampling carries the same prompt less the facts' message
    (engine.api.Contrast, weight W), which shares everything before that message with the prompt (so the
    prefix cache serves both) and still ends with the player's line; on by default, off at 0."""
    root, engine = _sample_characters(tmp_path), RecordingEngine(tokenizer)
    line = "What does a sword cost here?"
    contrast = _turn_sampling(root, engine, Grounding(fact_contrast=0.5), line).contrast
    prompt, without = tokenizer.decode(engine.prompts[-1]), tokenizer.decode(list(contrast.prompt_without))
    assert contrast.weight == 0.5 and "A sword costs 40 gold" in prompt
    assert "What you know" not in without and "40 gold" not in without
    head = prompt.split("system\nWhat you know")[0]  # (decoded without the control tokens)
    assert without == head + prompt[prompt.rindex("user\n" + line):]
    assert _turn_sampling(root, engine, Grounding(), line).contrast.weight == FACT_CONTRAST
    # A player's line that starts like the facts block is still the player's: the shadow keeps it.
    tricky = "What you know that bears on this: what does a sword cost?"
    without = tokenizer.decode(list(_turn_sampling(root, engine, Grounding(), tricky).contrast.prompt_without))
    assert without.endswith("user\n" + tricky + "\nassistant\n") and "40 gold" not in without
    assert _turn_sampling(root, engine, Grounding(fact_contrast=0), line).contrast is None
    engine.contrast_decoding = False  # a backend that cannot (remote, TensorRT-LLM): decoded plainly
    assert _turn_sampling(root, engine, Grounding(fact_contrast=0.5), line).contrast is None
