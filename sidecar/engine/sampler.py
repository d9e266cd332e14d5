"""Choosing next tokens from logits: greedy, or temperature / top-k / min-p / top-p, with repetition
penalty and a per-request seed. (Stop strings act on text: engine/output.py.)"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sidecar.engine.api import Contrast, SamplingParams


class Sampler:
    """Samples one sequence's tokens; its own generator makes a seeded request reproducible."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._generator = torch.Generator()
        if params.seed is not None:
            self._generator.manual_seed(params.seed)
        else:
            self._generator.seed()

    def __call__(self, logits: torch.Tensor, previous: Sequence[int] = ()) -> int:
        """logits: float32 [V] for one position; `previous` are the prompt and reply ids so far."""
        p = self.params
        if p.repetition_penalty != 1.0 and previous:
            logits = apply_repetition_penalty(logits, previous, p.repetition_penalty)
        if p.greedy:
            return int(torch.argmax(logits))
        return int(torch.multinomial(sampling_probs(logits, p), 1, generator=self._generator))


def sampling_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a non-greedy token is drawn from: softmax(logits / T) restricted to the
    top_k tokens, to those at least min_p x the likeliest's probability, and to the smallest set whose
    mass reaches top_p (renormalised by multinomial)."""
    # A valid temperature or repetition penalty near 0 (down to float32's 1e-45) pushes logits past
    # float32's range, and softmax over +inf gives NaN, which multinomial refuses: work in float64
    # and cap +inf, so the largest logits tie and the draw stays (nearly) greedy.
    dtype = logits.dtype
    logits = (logits.double() / p.temperature).clamp(max=torch.finfo(torch.float64).max)
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0)
    if p.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs.to(dtype)


def contrasted(logits: torch.Tensor, without: torch.Tensor, contrast: Contrast) -> torch.Tensor:
    """(1 + w) log p - w log q for the tokens with p >= PLAUSIBLE x max p, -inf for the rest; p from
    `logits` (a token they hold at -inf, such as one the grammar forbids, stays there), q from `without`."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(without.float(), dim=-1)
    mixed = (1 + contrast.weight) * logp - contrast.weight * logq
    return mixed.masked_fill(logp < logp.max() + math.log(contrast.PLAUSIBLE), -math.inf)


def apply_repetition_penalty(logits: torch.Tensor, previous: Sequence[int], penalty: float) -> torch.Tensor:
    """Hugging Face's definition: for every token id seen, logit / penalty if positive, else * penalty."""
    ids = torch.tensor(sorted(set(previous)), dtype=torch.long)
    seen = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return out


def sample_batch(logits: torch.Tensor, samplers: list[Sampler], histories: list[Sequence[int]]) -> list[int]:
    """One token per row of logits [B, V]: one argmax for the plain greedy rows, the rest row by row."""
    by_row = [not s.params.greedy or s.params.repetition_penalty != 1.0 for s in samplers]
    tokens = logits.argmax(-1).tolist() if not all(by_row) else [0] * len(samplers)
    rows = [b for b, needs_row in enumerate(by_row) if needs_row]
    if rows:  # on the CPU, in one copy: each request's generator lives there (seeded replies match across devices)
        on_cpu = logits[rows].cpu()
        for i, b in enumerate(rows):
            tokens[b] = samplers[b](on_cpu[i], histories[b])
    return tokens
