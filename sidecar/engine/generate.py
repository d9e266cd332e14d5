"""One sequence at a time: prefill, then decode until EOS or max_tokens (`npc generate`).

The batched, continuously scheduled path is the AsyncEngine; this loop is the simple reference
for scripts and checks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from sidecar.engine.sampler import Sampler, SamplingParams
from sidecar.engine.tokenizer import Tokenizer
from sidecar.errors import UserError
from sidecar.model.llama import LlamaModel
from sidecar.model.lora import LoraAdapter, LoraBatch, LoraSlots


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (EOS) or "length" (max_tokens)
    prefill_s: float = 0.0
    decode_s: float = 0.0


def generate_stream(model: LlamaModel, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                    result: Generation | None = None, adapter: LoraAdapter | None = None) -> Iterator[str]:
    """Yields text pieces as tokens are sampled; fills `result` (ids, text, finish reason, timings)."""
    if not prompt_ids:
        raise UserError("the prompt is empty")
    total = len(prompt_ids) + params.max_tokens
    limit = model.config.max_position
    if total > limit:
        raise UserError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                        f"exceeds the model's context of {limit} tokens")
    result = result if result is not None else Generation(list(prompt_ids))
    result.prompt_token_ids = list(prompt_ids)
    sampler, detok = Sampler(params), tokenizer.detokenizer()
    cache = model.new_cache(rows=1, max_len=total)
    eos = set(tokenizer.eos_ids)
    slots = None
    if adapter is not None:
        slots = LoraSlots(model.config, num_slots=1, dtype=model.dtype, rank=adapter.rank, device=model.device)
        slots.load(0, adapter)

    def lora(tokens: int) -> LoraBatch | None:
        return None if slots is None else LoraBatch(slots, [0], tokens)

    t0 = time.perf_counter()
    logits = model.forward(torch.tensor([prompt_ids]), start=[0], rows=[0], cache=cache, lora=lora(len(prompt_ids)))
    result.prefill_s = time.perf_counter() - t0
    position = len(prompt_ids)
    t0 = time.perf_counter()
    while True:
        token = sampler(logits[0], prompt_ids + result.token_ids)
        if token in eos and not params.ignore_eos:
            result.finish_reason = "stop"
            break
        result.token_ids.append(token)
        piece = detok.push(token)
        result.text += piece
        if piece:
            yield piece
        if len(result.token_ids) >= params.max_tokens:
            result.finish_reason = "length"
            break
        logits = model.forward(torch.tensor([[token]]), start=[position], rows=[0], cache=cache, lora=lora(1))
        position += 1
    tail = detok.flush()
    if tail:
        result.text += tail
        yield tail
    result.decode_s = time.perf_counter() - t0


def generate(model: LlamaModel, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
             adapter: LoraAdapter | None = None) -> Generation:
    result = Generation(list(prompt_ids))
    for _ in generate_stream(model, tokenizer, prompt_ids, params, result, adapter):
        pass
    return result
