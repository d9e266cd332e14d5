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

import torch

from sidecar.config import ModelConfig
from sidecar.dialogue.characters import load_character
from sidecar.dialogue.prompt import build_messages
from sidecar.dialogue.sessions import Turn
from sidecar.engine.base_model import load_base_model
from sidecar.engine.generate import Generation, generate_stream
from sidecar.engine.sampler import SamplingParams
from sidecar.errors import UserError
from sidecar.model.lora import LoraBatch, LoraSlots, load_peft_adapter
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

    base = load_base_model(ModelConfig(model_path, weights))
    model, tok = base.model, base.tokenizer
    adapter = load_peft_adapter(character.adapter_path, model.config, name=character.id, scale=character.lora_scale)
    slots = LoraSlots(model.config, num_slots=1, dtype=model.dtype, rank=adapter.rank)
    slots.load(0, adapter)
    examples = [render(tok, character, c, model.config.max_position) for c in held]
    nll_a, nll_b, count = 0.0, 0.0, 0
    for e in examples:
        nll_a += _nll(model, e, LoraBatch(slots, [0], len(e.input_ids)))
        nll_b += _nll(model, e, None)
        count += e.supervised

    side_by_side = []
    params = SamplingParams(max_tokens=60, temperature=0.7, top_p=0.9, seed=seed)
    for conv in held[:samples]:
        history = [Turn(character.id, p, n) for p, n in conv.exchanges[:-1]]
        player, reference = conv.exchanges[-1]
        ids = tok.encode_chat(build_messages(character, history, player, conv.world, conv.player_name))
        replies = []
        for lora in (adapter, None):
            result = Generation(ids)
            for _ in generate_stream(model, tok, ids, params, result, lora):
                pass
            replies.append(result.text.strip())
        side_by_side.append(Sample(player, reference, *replies))
    return EvalResult(character.id, len(held), count, math.exp(nll_a / count), math.exp(nll_b / count),
                      tuple(side_by_side))


def _nll(model, example: Example, lora: LoraBatch | None) -> float:
    """Summed negative log-likelihood of the supervised tokens (teacher forcing, one forward)."""
    ids = torch.tensor([example.input_ids])
    cache = model.new_cache(1, len(example.input_ids))
    logits = model.forward(ids, start=[0], rows=[0], cache=cache, all_logits=True, lora=lora)[0]
    targets = torch.tensor(example.labels[1:])
    keep = targets != IGNORE
    logp = torch.log_softmax(logits[:-1][keep].float(), dim=-1)
    return -logp.gather(1, targets[keep][:, None]).sum().item()
