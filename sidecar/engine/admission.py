"""What every backend accepts (the torch engine, a remote server, TensorRT-LLM): one set of input
checks and one queue rule, so a request is refused alike, in the same words, whichever one serves it."""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.engine.api import QueueFull
from sidecar.errors import UserError


def check_request(prompt: Sequence[int], choices: Sequence[Sequence[int]] | None, max_len: int,
                  vocab_size: int) -> int:
    """Raises UserError naming what is wrong with a submitted request; returns the room left for its
    reply (the tokens that still fit in max_len after the prompt and the longest candidate)."""
    if not prompt:
        raise UserError("prompt is empty")
    if choices is not None and (not choices or any(not c for c in choices)):
        raise UserError("choices must be a non-empty list of non-empty token lists")
    longest = max((len(c) for c in choices), default=0) if choices else 0
    room = max_len - len(prompt) - longest
    if room < 1:
        raise UserError(f"prompt has {len(prompt)} tokens; the limit is {max_len - 1} (max_seq_len)")
    if any(not 0 <= t < vocab_size for t in prompt) or any(not 0 <= t < vocab_size for c in choices or () for t in c):
        raise UserError(f"prompt or choices hold token ids outside the vocabulary [0, {vocab_size})")
    return room


def check_queue(waiting_replies: int, max_waiting: int, scoring: bool, stopping: bool = False) -> None:
    """Raises QueueFull for a reply that would wait beyond max_waiting, or for anything once stopping.

    Only replies count and only replies are refused: a scoring request (choices) finishes a
    conversation already admitted and never takes a place in the batch (the torch engine runs it
    first, in its staging row), so refusing it, or a reply because of it, would fail a Talk for nothing.
    """
    if stopping:
        raise QueueFull("the engine is shutting down")
    if not scoring and waiting_replies >= max_waiting:
        raise QueueFull(f"{waiting_replies} requests are already waiting (max_waiting {max_waiting})")
