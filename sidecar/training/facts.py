"""Fact accuracy: does the character state its own facts when a player asks for them?

`characters/<id>/facts.jsonl`, one question per line:

    {"question": "how much would a blade set me back?", "answers": ["40 gold", "forty gold"]}

The reply is right when one accepted answer appears in its text (case-insensitive, whitespace
folded) and does not start inside a longer word or number ("5 gold" is not found in "25 gold" or
"forty-five gold"). Questions are asked as a player would ask them, with nothing else in the
conversation; the prompt is the one the sidecar builds (the retrieved facts included).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sidecar.dialogue.characters import Character
from sidecar.dialogue.prompt import build_messages, grounded_sampling
from sidecar.dialogue.reply_format import reply_format
from sidecar.dialogue.retrieval import FactRetriever, Grounding
from sidecar.engine.api import AdapterRef, SamplingParams
from sidecar.engine.offline import OfflineEngine, Request
from sidecar.engine.tokenizer import ChatMessage, Tokenizer
from sidecar.errors import UserError

FACTS_FILE = "facts.jsonl"
# Sampled at the character's own settings, as a player meets it: four tries per question (with two, the
# share moved by +-0.07 between runs of the same adapter on 21-27 questions).
SEEDS = (0, 1, 2, 3)


class FactsFileError(UserError):
    """A problem in facts.jsonl; the message names the file and line."""


@dataclass(frozen=True)
class FactQuestion:
    line: int
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class FactScores:
    """Share of right replies: greedy, and sampled at the character's settings (each SEEDS)."""

    greedy: float
    sampled: float
    wrong: tuple[tuple[str, str], ...]  # (question, greedy reply) for each greedy miss
    # Share of replies that miss and state another question's answer instead ("Torvik closed last month"):
    # what decoding toward the facts block risks (npc serve --fact-boost / --fact-contrast).
    mixed_greedy: float = 0.0
    mixed_sampled: float = 0.0

    def to_json(self) -> dict:
        return {"greedy": self.greedy, "sampled": self.sampled, "mixed_greedy": self.mixed_greedy,
                "mixed_sampled": self.mixed_sampled, "wrong": [list(w) for w in self.wrong]}


def read_facts(path: Path) -> list[FactQuestion]:
    questions = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise FactsFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
            raise FactsFileError(f'{where}: expected {{"question": "...", "answers": ["...", ...]}}')
        answers = obj.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise FactsFileError(f"{where}: answers must be a non-empty list of non-empty texts")
        unknown = set(obj) - {"question", "answers", "fact"}
        if unknown:
            raise FactsFileError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: answers, fact, question")
        questions.append(FactQuestion(number, obj["question"].strip(), tuple(a.strip() for a in answers)))
    if not questions:
        raise FactsFileError(f"{path}: empty: no question to ask")
    return questions


def answered(reply: str, answers: tuple[str, ...]) -> bool:
    text = _fold(reply)
    return any(re.search(r"(?<![\w-])" + re.escape(_fold(a)), text) for a in answers)


def score_facts(engine: OfflineEngine, character: Character, adapter: AdapterRef | None,
                retriever: FactRetriever, questions: list[FactQuestion]) -> FactScores:
    tok, gen = engine.tokenizer, character.generation
    fmt = reply_format(character.emotions, character.actions, {}, None)
    settings = [SamplingParams(max_tokens=gen.max_tokens)] + [
        SamplingParams(max_tokens=gen.max_tokens, temperature=gen.temperature, top_p=gen.top_p,
                       min_p=gen.min_p, seed=s) for s in SEEDS]
    requests = []
    for q in questions:
        messages = build_messages(character, [], q.question, fmt=fmt, facts=retriever.facts(character, q.question))
        ids = tok.encode_chat(messages)
        requests += [Request(ids, adapter, as_served(tok, messages, ids, fmt.sampling(p, 512), retriever.grounding))
                     for p in settings]
    replies = [fmt.parse(event.text).text for event in engine.run(requests)]
    per = len(settings)
    right = [[answered(replies[i * per + j], q.answers) for j in range(per)] for i, q in enumerate(questions)]
    # A miss that states another question's answer: a fact from the block put where it does not belong.
    mixed = [[not right[i][j] and any(answered(replies[i * per + j], o.answers) for o in questions
                                      if not set(map(_fold, o.answers)) & set(map(_fold, q.answers)))
              for j in range(per)] for i, q in enumerate(questions)]
    wrong = tuple((q.question, replies[i * per]) for i, q in enumerate(questions) if not right[i][0])
    n, sampled = len(questions), len(questions) * len(SEEDS)
    return FactScores(sum(r[0] for r in right) / n, sum(sum(r[1:]) for r in right) / sampled, wrong,
                      sum(m[0] for m in mixed) / n, sum(sum(m[1:]) for m in mixed) / sampled)


def as_served(tok: Tokenizer, messages: list[ChatMessage], ids: list[int], sampling: SamplingParams,
              grounding: Grounding) -> SamplingParams:
    """`sampling` as a served turn decodes with this prompt: toward its facts block as `npc serve`'s
    --fact-boost / --fact-contrast (the retriever's `grounding`) ask."""
    return grounded_sampling(tok, messages, ids, sampling, grounding.fact_boost, grounding.fact_contrast)


def _fold(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").split())
