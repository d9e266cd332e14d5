"""Relationships through the dialogue layer: an action's effects move a value (clamped), the next prompt carries
the new tier, the turn's end reports it, and the session store's journal replays it."""

from __future__ import annotations

import asyncio
import shutil

from sidecar.config import RequestLimits
from sidecar.dialogue.registry import CharacterRegistry
from sidecar.dialogue.sessions import SessionStore
from sidecar.dialogue.turn import Dialogue, TalkInput, TurnAction, TurnFinished
from tests.recording_engine import RecordingEngine
from tests.sidecar_process import REPO


def _dialogue(tmp_path, tokenizer, reply: str) -> tuple[Dialogue, RecordingEngine, list]:
    root = tmp_path / "characters"
    shutil.copytree(REPO / "characters" / "blacksmith", root / "blacksmith", ignore=shutil.ignore_patterns(
        "adapter", "training", "*.jsonl"))
    path = root / "blacksmith" / "character.yaml"
    path.write_text("\n".join(x for x in path.read_text().splitlines() if not x.startswith("adapter:")))
    records: list = []
    sessions = SessionStore()
    sessions.on_change = records.append
    engine = RecordingEngine(tokenizer, reply=reply)
    return Dialogue(engine, CharacterRegistry(root), sessions, RequestLimits()), engine, records


def _talk(dialogue: Dialogue, session: str, line: str) -> list:
    async def run():
        talk = TalkInput("blacksmith", session, line, world={}, player_name="",
                         entities={"stock": ("war axe", "helm")})
        return [event async for event in dialogue.talk(talk)]

    return asyncio.run(run())


def test_an_action_moves_the_relationship_its_effects_name(tmp_path, tokenizer):
    sale = '[proud] Good choice, lad.\n@sell_item {"item": "war axe"}'
    dialogue, engine, records = _dialogue(tmp_path, tokenizer, sale)
    events = _talk(dialogue, "s", "I'll take the war axe.")
    assert [e.action.name for e in events if isinstance(e, TurnAction)] == ["sell_item"]
    finished = events[-1]
    assert isinstance(finished, TurnFinished)
    # sell_item's effects: {gold: "+price"} (the game's) and {trust: "+3"} (a relationship: applied here).
    assert [(r.name, r.value, r.tier.name) for r in finished.relationships] == [("trust", 3, "wary")]
    assert "How you stand with the player:\n- trust: wary (0)." in tokenizer.decode(engine.prompts[0])
    for _ in range(6):
        events = _talk(dialogue, "s", "Another one.")
    assert events[-1].relationships[0].value == 21 and events[-1].relationships[0].tier.name == "friendly"
    assert "- trust: friendly (21). You like this one" not in tokenizer.decode(engine.prompts[-1])  # before it
    events = _talk(dialogue, "s", "And one more.")
    assert "- trust: friendly (21). You like this one" in tokenizer.decode(engine.prompts[-1])
    dialogue.set_relationship("s", "blacksmith", "trust", value=99)
    assert _talk(dialogue, "s", "Last one.")[-1].relationships[0].value == 100  # clamped to max
    # A one-off line (no session) has nowhere to keep a value: nothing moves, nothing is reported.
    assert _talk(dialogue, "", "I'll take the war axe.")[-1].relationships == ()

    # The journal (what --session-store writes) rebuilds the same values.
    replayed = SessionStore()
    for record in records:
        replayed.apply(record)
    assert replayed.relationships("s", "blacksmith") == {"trust": 100}
    assert replayed.export("s")["relationships"] == [{"character_id": "blacksmith", "name": "trust", "value": 100}]


def test_a_stored_value_outside_a_narrowed_range_is_clamped(tmp_path, tokenizer):
    dialogue, _, _ = _dialogue(tmp_path, tokenizer, "[gruff] Hmph.")
    dialogue.sessions.import_({"format": 1, "session_id": "old", "turns": [],
                               "relationships": [{"character_id": "blacksmith", "name": "trust", "value": 5000},
                                                 {"character_id": "blacksmith", "name": "fear", "value": 3}]})
    values = dialogue.relationships("old", "blacksmith")
    assert [(v.name, v.value) for v in values] == [("trust", 100)]  # `fear` is no longer declared: not shown
