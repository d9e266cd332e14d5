"""Choosing next tokens from logits: greedy, or temperature / top-k / top-p, with repetition
penalty, stop strings and a per-request seed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sidecar.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = all tokens
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the reply
    stop: tuple[str, ...] = ()  # the reply ends before the first occurrence of any of these
    seed: int | None = None  # same seed, same request, run alone -> same reply
    ignore_eos: bool = False  # benchmarks: always generate max_tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
    top_k tokens and to the smallest set whose mass reaches top_p (renormalised by multinomial)."""
    # A valid temperature or repetition penalty near 0 (down to float32's 1e-45) pushes logits past
    # float32's range, and softmax over +inf gives NaN, which multinomial refuses: work in float64
    # and cap +inf, so the largest logits tie and the draw stays (nearly) greedy.
    dtype = logits.dtype
    logits = (logits.double() / p.temperature).clamp(max=torch.finfo(torch.float64).max)
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs.to(dtype)


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


class StopStringFilter:
    """Streams text but holds back what could be the start of a stop string; finds the first stop."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.text = ""  # everything decoded so far
        self.emitted = 0  # how much of `text` has been released

    def push(self, piece: str) -> tuple[str, bool]:
        """Adds decoded text; returns (text safe to emit now, whether a stop string was hit)."""
        self.text += piece
        if not self.stops:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out, False
        # Search only where a new match can be: from the first unreleased character on.
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.emitted:end] if end > self.emitted else ""
            self.text, self.emitted = self.text[:end], end
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        safe = len(self.text) - hold
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out
