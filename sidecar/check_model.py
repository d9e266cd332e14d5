"""`npc check-model FILE`: what a model file is, what the sidecar makes of each tensor kind, the memory
it will take, and how fast it decodes on this machine (batch 1 and 8), before anyone points
`make serve` at it.

Loading goes through the same path as `npc serve` (engine/base_model.py), so every refusal is the one
the server would give; the speed is the model's own forward step (prefill, then greedy decode of
`steps` tokens into a static cache), not the engine's scheduling around it.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from sidecar.bench.report import machine_description
from sidecar.config import ModelConfig
from sidecar.engine.base_model import describe_formats, load_base_model
from sidecar.model.checkpoint import load_checkpoint
from sidecar.model.llama import LlamaModel
from sidecar.model.quant import PromptDenseLinear

PROMPT_TOKENS = 32


@dataclass(frozen=True)
class ModelCheck:
    path: Path
    architecture: str
    parameters: int
    layers: int
    hidden_size: int
    heads: str  # "32 query / 8 key-value"
    context: int
    vocab_size: int
    tokenizer: str  # "byte_level (qwen2)" ...
    chat_template: bool
    stored_kinds: dict[str, int]  # kind -> tensors in the file
    became: str  # engine/base_model.describe_formats
    weights: str
    weight_bytes: int  # in memory, as loaded (prompt copies included)
    prompt_copy_bytes: int  # of that, the bf16 copies prompt chunks read (--prompt-weights)
    kv_bytes_per_token: int  # one sequence's K/V cost per token of context
    decode_tokens_per_s: dict[int, float]  # batch -> tokens/s, all rows together
    machine: dict

    def lines(self) -> list[str]:
        mib = 1 << 20
        copies = (f"bf16 copies ({self.prompt_copy_bytes / mib:.0f} MiB)" if self.prompt_copy_bytes
                  else "the same weights")
        speed = ", ".join(f"batch {b}: {r:.1f} tokens/s" for b, r in self.decode_tokens_per_s.items())
        return [
            f"file          {self.path} ({self.path.stat().st_size / mib:.0f} MiB)",
            f"architecture  {self.architecture}, {self.parameters / 1e6:.0f}M parameters, {self.layers} layers, "
            f"hidden {self.hidden_size}, heads {self.heads}, context {self.context}, vocabulary {self.vocab_size}",
            f"tokenizer     {self.tokenizer}; chat template: "
            + ("yes" if self.chat_template else "NO (npc serve refuses it)"),
            "stored kinds  " + ", ".join(f"{k} x{n}" for k, n in sorted(self.stored_kinds.items())),
            f"in memory     {self.weights}: {self.became}; prompt chunks: {copies}",
            f"memory        weights {self.weight_bytes / mib:.0f} MiB; K/V {self.kv_bytes_per_token / 1024:.1f} KiB "
            f"per token per NPC ({self.kv_bytes_per_token * 1024 / mib:.0f} MiB for a 1,024-token conversation)",
            f"decode        {speed} on {self.machine['cpu']} ({self.machine['torch_threads']} threads)",
        ]


def check_model(path: Path, weights: str = "auto", device: str = "cpu", batches: tuple[int, ...] = (1, 8),
                steps: int = 32) -> ModelCheck:
    ckpt = load_checkpoint(path)
    base = load_base_model(ModelConfig(path, weights, device), progress=True)
    model, c = base.model, ckpt.config
    parameters = sum(math.prod(t.shape) for t in ckpt.tensors.values())
    tok = base.tokenizer
    return ModelCheck(
        path=Path(path), architecture=c.architecture, parameters=parameters, layers=c.num_layers,
        hidden_size=c.hidden_size, heads=f"{c.num_heads} query / {c.num_kv_heads} key-value", context=c.max_position,
        vocab_size=c.vocab_size, tokenizer=tok.kind + (f" ({ckpt.tokenizer.pre})" if hasattr(ckpt.tokenizer, "pre")
                                                       else ""),
        chat_template=bool(tok.chat_template), stored_kinds=dict(Counter(t.kind for t in ckpt.tensors.values())),
        became=describe_formats(model), weights=model.weights, weight_bytes=_weight_bytes(model),
        prompt_copy_bytes=model.prompt_copy_bytes(held=True),
        kv_bytes_per_token=2 * c.num_layers * c.kv_size * torch.tensor([], dtype=model.dtype).element_size(),
        decode_tokens_per_s={b: _decode_rate(model, b, steps) for b in batches}, machine=machine_description())


def _weight_bytes(model: LlamaModel) -> int:
    """Every tensor the model holds (the linears' packed codes and scales, embedding, norms)."""
    seen: dict[int, int] = {}

    def add(obj: object) -> None:
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor):
                seen[value.data_ptr()] = value.numel() * value.element_size()  # a tied head counts once

    for layer in model.layers:
        add(layer)
    for linear in model.layer_matrices():
        for part in (linear.compact, linear.dense) if isinstance(linear, PromptDenseLinear) else (linear,):
            add(part)
    add(model.head)
    table = model.embed if isinstance(model.embed, torch.Tensor) else model.embed.blocks  # stored blocks
    seen[table.data_ptr()] = table.numel() * table.element_size()
    seen[model.norm.data_ptr()] = model.norm.numel() * model.norm.element_size()
    return sum(seen.values())


def _decode_rate(model: LlamaModel, batch: int, steps: int) -> float:
    """Tokens per second over `steps` greedy decode steps of `batch` rows after a PROMPT_TOKENS prefill."""
    cache = model.new_cache(batch, PROMPT_TOKENS + steps + 1)
    tokens = torch.randint(0, model.config.vocab_size, (batch, PROMPT_TOKENS),
                           generator=torch.Generator().manual_seed(0))
    logits = model.forward(tokens, [0] * batch, list(range(batch)), cache)
    started = time.perf_counter()
    for step in range(steps):
        logits = model.forward(logits.argmax(-1, keepdim=True), [PROMPT_TOKENS + step] * batch, list(range(batch)),
                               cache)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)
