"""`npc eval CHARACTER_DIR`: does the adapter speak like the character? Perplexity of the held-out
NPC replies (a) with the adapter and the persona prompt, (b) with the persona prompt alone on the
base model, on the weights the sidecar serves; plus a few replies side by side.

The held-out lines are the ones `npc train` left out (its report.json); without a report, the
same seeded split with the default settings.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from sidecar.config import ModelConfig
from sidecar.dialogue.characters import load_character
from sidecar.dialogue.prompt import build_messages
from sidecar.dialogue.sessions import Turn
from sidecar.engine.api import AdapterRef, SamplingParams
from sidecar.engine.offline import OfflineEngine, Request
from sidecar.errors import UserError
from sidecar.training.data import DIALOGUE_FILE, IGNORE, Example, read_dialogue, render, split
from sidecar.training.train import REPORT_DIR, TrainConfig


@dataclass(frozen=True)
class Sample:
    player: str
    reference: str
    adapter: str
    base: str


@dataclass(frozen=True)
class EvalResult:
    character: str
    held_out_lines: int
    reply_tokens: int
    perplexity_adapter: float
    perplexity_base: float
    samples: tuple[Sample, ...]

    @property
    def ratio(self) -> float:
        return self.perplexity_adapter / self.perplexity_base

    def to_json(self) -> dict:
        return {"character": self.character, "held_out_lines": self.held_out_lines, "reply_tokens": self.reply_tokens,
                "perplexity_adapter": self.perplexity_adapter, "perplexity_base": self.perplexity_base,
                "ratio": self.ratio, "samples": [s.__dict__ for s in self.samples]}


def evaluate_character(folder: Path, model_path: Path, weights: str = "auto", samples: int = 3,
                       seed: int = 0) -> EvalResult:
    character = load_character(folder)
    if character.adapter_path is None:
        raise UserError(f"{folder / 'character.yaml'}: adapter: not set; train one first (npc train {folder})")
    conversations = read_dialogue(folder / DIALOGUE_FILE)
    report = folder / REPORT_DIR / "report.json"
    if report.is_file():
        held_lines = set(json.loads(report.read_text())["held_out_lines"])
        held = [c for c in conversations if c.line in held_lines]
    else:
        defaults = TrainConfig()
        held = split(conversations, defaults.held_out, defaults.seed)[1]
    if not held:
        raise UserError(f"{folder}: no held-out conversations to evaluate (train with --held-out > 0)")

    with OfflineEngine(ModelConfig(model_path, weights)) as engine:
        adapter = engine.load_adapter(character.id, character.adapter_path, scale=character.lora_scale)
        tok = engine.tokenizer
        examples = [render(tok, character, c, engine.engine.model.shape.max_position) for c in held]
        nll_a, nll_b = (_nll(engine, examples, lora) for lora in (adapter, None))
        count = sum(e.supervised for e in examples)

        side_by_side = []
        params = SamplingParams(max_tokens=60, temperature=0.7, top_p=0.9, seed=seed)
        for conv in held[:samples]:
            history = [Turn(character.id, p, n) for p, n in conv.exchanges[:-1]]
            player, reference = conv.exchanges[-1]
            ids = tok.encode_chat(build_messages(character, history, player, conv.world, conv.player_name))
            replies = engine.run([Request(ids, adapter, params), Request(ids, None, params)])
            side_by_side.append(Sample(player, reference, *(r.text.strip() for r in replies)))
    return EvalResult(character.id, len(held), count, math.exp(nll_a / count), math.exp(nll_b / count),
                      tuple(side_by_side))


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
