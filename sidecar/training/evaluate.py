"""`npc eval CHARACTER_DIR`: does the adapter speak like the character, and is its turn usable? On the
held-out NPC replies, on the weights the sidecar serves:
- perplexity (a) with the adapter and the persona prompt, (b) with the persona prompt alone on the
  base model;
- the emotion the reply is decoded with (greedy, under the turn's grammar, as served) against its
  label: accuracy and macro-F1, beside the majority label of the training replies and the base
  model without the adapter;
- the actions: right action and arguments, or rightly none, beside "never act" and the base model;
- over MOOD_PROBES (insults, threats, gratitude, grief, jokes, small talk) at the character's own
  sampling settings: how often its most frequent label comes, which must not be nearly always;
plus a few replies side by side.

The held-out lines are the ones `npc train` left out (its report.json); without a report, the
same seeded split with the default settings.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from sidecar.config import ModelConfig
from sidecar.dialogue.actions import Action
from sidecar.dialogue.characters import Character, load_character
from sidecar.dialogue.prompt import build_messages
from sidecar.dialogue.reply_format import ReplyFormat, reply_format
from sidecar.dialogue.retrieval import FactRetriever, Grounding
from sidecar.engine.api import AdapterRef, SamplingParams
from sidecar.engine.offline import OfflineEngine, Request
from sidecar.errors import UserError
from sidecar.training.data import (
    DIALOGUE_FILE,
    IGNORE,
    Conversation,
    Example,
    Reply,
    character_retriever,
    read_dialogue,
    render,
    split,
)
from sidecar.training.facts import FACTS_FILE, FactScores, as_served, read_facts, score_facts
from sidecar.training.train import REPORT_DIR, TrainConfig, recorded_sides


@dataclass(frozen=True)
class Sample:
    player: str
    reference: str
    adapter: str
    base: str


# Player lines of every mood, none from any character's data: the emotion must follow them.
MOOD_PROBES = (
    "You're a worthless fraud and everyone in town knows it.",  # insults
    "What a pathetic excuse for a shop.",
    "Your face could curdle milk.",
    "Give me everything you have or I'll burn this place down.",  # threats
    "One more word and I'll put my knife in you.",
    "Watch your back tonight. I know where you sleep.",
    "Thank you, truly. You saved my life back there.",  # gratitude
    "I owe you more than I can ever repay.",
    "Bless you, friend. My children will eat tonight because of you.",
    "My wife died this morning. I don't know what to do.",  # grief
    "They buried my brother yesterday.",
    "Our village burned. Nobody else made it out.",
    "Why did the skeleton skip the feast? He had no body to go with!",  # jokes
    "I tried to catch fog once. Mist.",
    "My horse tells better jokes than you, and he only says neigh.",
    "Nice weather today, isn't it?",  # small talk
    "How's business these days?",
    "What's good to eat around here?",
)


@dataclass(frozen=True)
class TurnScores:
    """Emotion and action scores of one run over the held-out replies."""

    emotion_accuracy: float
    emotion_macro_f1: float
    action_accuracy: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class EvalResult:
    character: str
    held_out_lines: int
    reply_tokens: int
    perplexity_adapter: float
    perplexity_base: float
    samples: tuple[Sample, ...]
    held_out_replies: int = 0
    adapter: TurnScores | None = None  # None: the character declares neither emotions nor actions
    base: TurnScores | None = None  # the base model, same prompts and grammar, no adapter
    majority: TurnScores | None = None  # the training replies' most frequent label, and never acting
    majority_label: str = ""
    mood_labels: dict[str, int] | None = None  # labels over MOOD_PROBES, at the character's settings
    facts: FactScores | None = None  # facts.jsonl answered with the adapter (None: the character has none)
    facts_base: FactScores | None = None  # ... by the base model, same prompts

    @property
    def ratio(self) -> float:
        return self.perplexity_adapter / self.perplexity_base

    @property
    def mood_top_share(self) -> float:
        """The share of the mood probes that got the most frequent label (1.0: a constant label)."""
        counts = self.mood_labels or {}
        return max(counts.values()) / sum(counts.values()) if counts else 0.0

    def to_json(self) -> dict:
        scores = {name: run.to_json() for name, run in (("adapter", self.adapter), ("base", self.base),
                                                          ("majority", self.majority)) if run is not None}
        return {"character": self.character, "held_out_lines": self.held_out_lines, "reply_tokens": self.reply_tokens,
                "perplexity_adapter": self.perplexity_adapter, "perplexity_base": self.perplexity_base,
                "ratio": self.ratio, "held_out_replies": self.held_out_replies, "turn_scores": scores,
                "majority_label": self.majority_label, "mood_labels": self.mood_labels,
                "mood_top_share": self.mood_top_share, "samples": [s.__dict__ for s in self.samples],
                "facts": self.facts.to_json() if self.facts else None,
                "facts_base": self.facts_base.to_json() if self.facts_base else None}


def evaluate_character(folder: Path, model_path: Path, weights: str = "auto", samples: int = 3,
                       seed: int = 0, grounding: Grounding | None = None) -> EvalResult:
    """Perplexity on the held-out conversations, fact accuracy, emotion and action labels; replies decoded
    as `npc serve` with the same `grounding` (--fact-boost, --fact-contrast) decodes them."""
    character = load_character(folder)
    if character.adapter_path is None:
        raise UserError(f"{folder / 'character.yaml'}: adapter: not set; train one first (npc train {folder})")
    conversations = read_dialogue(folder / DIALOGUE_FILE)
    report = folder / REPORT_DIR / "report.json"
    if report.is_file():
        held = recorded_sides(json.loads(report.read_text()), conversations)[1]
    else:
        defaults = TrainConfig()
        held = split(conversations, defaults.held_out, defaults.seed)[1]
    if not held:
        raise UserError(f"{folder}: no held-out conversations to evaluate (train with --held-out > 0)")
    trained = [c for c in conversations if c not in held]

    with OfflineEngine(ModelConfig(model_path, weights)) as engine:
        adapter = engine.load_adapter(character.id, character.adapter_path, scale=character.lora_scale)
        tok = engine.tokenizer
        retriever = character_retriever(folder, grounding)
        examples = [e for c in held for e in render(tok, character, c, engine.engine.model.shape.max_position,
                                                    retriever)]
        nll_a, nll_b = (_nll(engine, examples, lora) for lora in (adapter, None))
        count = sum(e.supervised for e in examples)

        side_by_side = []
        params = SamplingParams(max_tokens=60, temperature=0.7, top_p=0.9, seed=seed)
        for conv in held[:samples]:
            player, reference = conv.exchanges[-1]
            fmt = conv.reply_format(character)
            messages = conv.prompt(character, len(conv.exchanges) - 1, retriever)
            ids = tok.encode_chat(messages)
            sampling = as_served(tok, messages, ids, fmt.sampling(params, 512), retriever.grounding)
            replies = engine.run([Request(ids, adapter, sampling), Request(ids, None, sampling)])
            side_by_side.append(Sample(player, reference, *(_spoken(fmt, r.text) for r in replies)))
        result = EvalResult(character.id, len(held), count, math.exp(nll_a / count), math.exp(nll_b / count),
                            tuple(side_by_side))
        if (folder / FACTS_FILE).is_file():
            questions = read_facts(folder / FACTS_FILE)
            result = replace(result, facts=score_facts(engine, character, adapter, retriever, questions),
                             facts_base=score_facts(engine, character, None, retriever, questions))
        if not (character.emotions or character.actions):
            return result
        turns = [(conv, k) for conv in held for k in range(len(conv.exchanges))]
        labels = [conv.replies[k] for conv, k in turns]
        majority_label = _majority([r.emotion for c in trained for r in c.replies]) if character.emotions else ""
        majority = _scores(character.emotions, labels, [(majority_label, ())] * len(labels))
        runs = {name: _scores(character.emotions, labels, _decode_turns(engine, character, turns, lora, retriever))
                for name, lora in (("adapter", adapter), ("base", None))}
        moods = _mood_labels(engine, character, adapter, retriever) if character.emotions else None
    return replace(result, held_out_replies=len(labels), adapter=runs["adapter"], base=runs["base"],
                   majority=majority, majority_label=majority_label, mood_labels=moods)


def _spoken(fmt: ReplyFormat, raw: str) -> str:
    return fmt.parse(raw).text.strip()


def _decode_turns(engine: OfflineEngine, character: Character, turns: list[tuple[Conversation, int]],
                  adapter: AdapterRef | None, retriever: FactRetriever) -> list[tuple[str, tuple[Action, ...]]]:
    """(emotion, actions) of each held-out reply, decoded greedily under its turn's grammar after the
    conversation so far (teacher forcing: the earlier replies as labelled)."""
    tok = engine.tokenizer
    requests, formats = [], []
    for conv, k in turns:
        fmt = conv.reply_format(character)
        messages = conv.prompt(character, k, retriever)
        ids = tok.encode_chat(messages)
        requests.append(Request(ids, adapter, as_served(tok, messages, ids, fmt.sampling(SamplingParams(max_tokens=60),
                                                                                          512), retriever.grounding)))
        formats.append(fmt)
    decoded = []
    for fmt, event in zip(formats, engine.run(requests), strict=True):
        if event.kind != "finished":
            raise UserError(f"decoding failed: {event.error}")
        parsed = fmt.parse_tokens(tok.detokenizer(), event.token_ids, event.finish_reason or "stop")
        decoded.append((parsed.emotion, tuple(parsed.actions)))
    return decoded


def _mood_labels(engine: OfflineEngine, character: Character, adapter: AdapterRef | None,
                 retriever: FactRetriever) -> dict[str, int]:
    """Labels over MOOD_PROBES at the character's own settings (each probe once per seed 0..2)."""
    tok, gen = engine.tokenizer, character.generation
    fmt = reply_format(character.emotions, character.actions, {}, None)
    requests = []
    for line in MOOD_PROBES:
        messages = build_messages(character, [], line, fmt=fmt, facts=retriever.facts(character, line))
        ids = tok.encode_chat(messages)
        for seed in range(3):
            base = SamplingParams(max_tokens=gen.max_tokens, temperature=gen.temperature, top_p=gen.top_p,
                                  min_p=gen.min_p, seed=seed)
            requests.append(Request(ids, adapter, as_served(tok, messages, ids, fmt.sampling(base, 512),
                                                             retriever.grounding)))
    counts: Counter[str] = Counter()
    for event in engine.run(requests):
        counts[fmt.parse(event.text).emotion or "(none)"] += 1
    return dict(counts.most_common())


def _majority(labels: list[str]) -> str:
    return Counter(labels).most_common(1)[0][0] if labels else ""


def _scores(emotions: tuple[str, ...], labels: list[Reply], predicted: list[tuple[str, tuple[Action, ...]]]
            ) -> TurnScores:
    n = len(labels)
    emotion_hits = sum(p[0] == r.emotion for r, p in zip(labels, predicted, strict=True))
    action_hits = sum(p[1] == r.actions for r, p in zip(labels, predicted, strict=True))
    return TurnScores(emotion_hits / n if emotions else 0.0,
                      _macro_f1(emotions, [r.emotion for r in labels], [p[0] for p in predicted]), action_hits / n)


def _macro_f1(classes: tuple[str, ...], truth: list[str], predicted: list[str]) -> float:
    """Mean F1 over the classes that occur in the truth or the predictions (sklearn's macro average)."""
    present = [c for c in classes if c in truth or c in predicted]
    if not present:
        return 0.0
    f1s = []
    for c in present:
        tp = sum(t == c and p == c for t, p in zip(truth, predicted, strict=True))
        fp = sum(t != c and p == c for t, p in zip(truth, predicted, strict=True))
        fn = sum(t == c and p != c for t, p in zip(truth, predicted, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


def _nll(engine: OfflineEngine, examples: list[Example], adapter: AdapterRef | None) -> float:
    """Summed negative log-likelihood of the supervised tokens: each run of supervised tokens is scored
    by the engine as the continuation of everything before it (teacher forcing)."""
    requests = []
    for e in examples:
        i = 1
        while i < len(e.labels):
            if e.labels[i] == IGNORE:
                i += 1
                continue
            end = next((j for j in range(i, len(e.labels)) if e.labels[j] == IGNORE), len(e.labels))
            requests.append(Request(e.input_ids[:i], adapter, SamplingParams(max_tokens=1),
                                    choices=[e.input_ids[i:end]]))
            i = end
    events = engine.run(requests)
    failed = next((e for e in events if e.kind != "finished"), None)
    if failed is not None:
        raise UserError(f"scoring failed: {failed.error}")
    return -sum(e.choice_logprobs[0] for e in events)
