"""Constrained choice: how likely is each candidate continuation of a prompt under the model?

Used for a reply's emotion label (the server asks the character which of its labels fits and
scores each one), so the answer is always one of the candidates: no free text to parse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sidecar.model.llama import KVCache, LlamaModel
from sidecar.model.lora import LoraBatch


def score_continuations(model: LlamaModel, cache: KVCache, row: int, start: int, next_logits: torch.Tensor,
                        candidates: Sequence[Sequence[int]],
                        lora_for: Callable[[int], LoraBatch | None]) -> list[float]:
    """log p(candidate | context) for each candidate: the sum of its tokens' log-probabilities.

    The context's K/V fill cache row `row` at positions < `start`, and `next_logits` [V] are the
    logits after its last token. Candidates are scored one after another in the positions from
    `start` on; each overwrites the last one's, and the causal mask hides anything beyond the
    positions a call writes. `lora_for(n)` gives the LoRA hook for n tokens (or None).
    """
    first = torch.log_softmax(next_logits.float(), dim=-1)
    scores = []
    for candidate in candidates:
        total = first[candidate[0]].item()
        if len(candidate) > 1:
            tokens = torch.tensor([list(candidate[:-1])])
            logits = model.forward(tokens, start=[start], rows=[row], cache=cache, all_logits=True,
                                   lora=lora_for(len(candidate) - 1))[0]
            logp = torch.log_softmax(logits.float(), dim=-1)
            total += logp.gather(1, torch.tensor(candidate[1:], device=logp.device)[:, None]).sum().item()
        scores.append(total)
    return scores
