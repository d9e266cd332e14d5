"""`npc eval`'s fact score (training/facts.py): what counts as right, as another fact stated instead, and that the
questions are decoded as `npc serve` decodes them (the served prompt, its grammar, the grounding)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sidecar.dialogue.characters import load_character
from sidecar.dialogue.lore import LoreLibrary
from sidecar.dialogue.retrieval import FactRetriever, Grounding
from sidecar.training.facts import SEEDS, read_facts, score_facts
from tests.sidecar_process import REPO

QUESTIONS = [
    {"question": "what does a blade cost?", "answers": ["40 gold", "forty gold"]},
    {"question": "who runs the tavern?", "answers": ["Torvik"]},
    {"question": "where is your forge?", "answers": ["north gate"]},
]


class ScriptedEngine:
    """Answers each request with the next scripted reply (the model's raw text) and keeps the requests."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tokenizer, self.replies, self.requests = tokenizer, replies, []

    def run(self, requests):
        self.requests += requests
        return [SimpleNamespace(text=self.replies[i % len(self.replies)]) for i in range(len(requests))]


def test_right_mixed_up_and_missed_replies_are_told_apart(tmp_path, tokenizer):
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    character = load_character(REPO / "characters" / "blacksmith")
    per = 1 + len(SEEDS)  # greedy, then each seed
    # Question 1: right every time ("Forty gold" folded). Question 2: greedy names the forge (another question's
    # answer: mixed up), the samples say nothing useful. Question 3: greedy misses, the samples get it right.
    script = ["[gruff] Forty gold, lad."] * per + ["[gruff] By the north gate, lad."] + ["[sad] Hmph."] * (per - 1) \
        + ["[gruff] Ask elsewhere."] + ["[proud] Up by the north gate."] * (per - 1)
    engine = ScriptedEngine(tokenizer, script)
    retriever = FactRetriever(LoreLibrary(REPO / "characters" / "lore"), Grounding(fact_contrast=0.5))
    scores = score_facts(engine, character, None, retriever, read_facts(path))
    assert scores.greedy == 1 / 3 and scores.sampled == pytest.approx(2 / 3)
    assert scores.mixed_greedy == 1 / 3 and scores.mixed_sampled == 0
    assert [q for q, _ in scores.wrong] == ["who runs the tavern?", "where is your forge?"]
    # Decoded as served: the grammar of the character's reply format, and against the prompt less its facts.
    first = engine.requests[0]
    assert first.sampling.grammar is not None and first.sampling.contrast.weight == 0.5
    assert len(first.sampling.contrast.prompt_without) < len(first.prompt)
    assert [r.sampling.temperature for r in engine.requests[:per]] == [0.0] + [character.generation.temperature] * 4
    assert [r.sampling.min_p for r in engine.requests[1:per]] == [character.generation.min_p] * 4
