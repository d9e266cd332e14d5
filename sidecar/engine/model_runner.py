"""Every forward pass of the torch engine, and the sampling after it: decode steps (eager, or CUDA
graphs through CudaDecoder), prefill chunks, and the scoring of candidate continuations.

`run(plan)` takes what the scheduler decided and returns token ids (or scores); it never changes
a sequence or a row assignment. Rows: running sequence i decodes in KV row i, prompts go
through a staging row (kv_cache.KvRows). A contrasted reply's shadow decodes in a row of its own;
its logits change the reply's choice and it takes the reply's token (SamplingParams.contrast).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from sidecar.config import EngineConfig
from sidecar.engine.grammar import Grammars
from sidecar.engine.sampler import contrasted, sample_batch
from sidecar.engine.scheduler import StepPlan
from sidecar.engine.sequence import Sequence
from sidecar.model.cuda import triton_available
from sidecar.model.llama import KVCache, LlamaModel
from sidecar.model.lora import LoraBatch, LoraSlots


@dataclass(frozen=True)
class StepResult:
    decode_tokens: list[int]  # one per plan.decode row
    first_token: int | None = None  # a reply whose prompt completed this step: its first token
    token_logprobs: list[list[float]] | None = None  # a scoring request that completed: each candidate's
    shadow_logits: torch.Tensor | None = None  # a shadow whose prompt completed: the logits after it [V]


@dataclass(frozen=True)
class _Masks:
    """One step's grammar masks: row of `bits` for each constrained sequence (by id), filled on the grammar thread."""

    index: dict[int, int]
    bits: Future[torch.Tensor]


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache, slots: LoraSlots, staging_row_of: Callable[[Sequence], int],
                 config: EngineConfig, grammars: Grammars, progress: bool = False):
        self.model, self.cache, self.slots, self.staging_row_of = model, cache, slots, staging_row_of
        self.grammars = grammars
        # On a GPU with Triton, decode steps run through CudaDecoder (captured graphs unless turned off).
        self.cuda_decoder = None
        if model.device.type == "cuda" and triton_available():
            from sidecar.engine.cuda_decode import CudaDecoder

            self.cuda_decoder = CudaDecoder(model, cache, slots, config.max_batch, config.cuda_graphs,
                                            progress=progress)
            if config.cuda_graphs:
                self.cuda_decoder.capture()

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> StepResult:
        seq = plan.prefill
        replying = plan.completes_prefill and not seq.scoring and seq.shadow_of is None
        sampled = [*(s for s in plan.decode if s.shadow_of is None), *([seq] if replying else [])]
        # The constrained rows' masks are computed on the grammar thread while the forwards run.
        masks = self._start_masks(sampled)
        decode_tokens = self._decode_step(plan.decode, masks) if plan.decode else []
        if seq is None:
            return StepResult(decode_tokens)
        lo, hi = plan.prefill_range
        logits = self._forward(seq, seq.prompt[lo:hi], lo)
        if not plan.completes_prefill:
            return StepResult(decode_tokens)
        if seq.choices is not None:
            return StepResult(decode_tokens, token_logprobs=self._score(seq, logits[0]))
        if seq.shadow_of is not None:
            return StepResult(decode_tokens, shadow_logits=logits[0])
        without = {0: seq.shadow.first_logits} if seq.shadow is not None else {}
        return StepResult(decode_tokens, first_token=self._sample([seq], logits, masks, without)[0])

    def _decode_step(self, seqs: list[Sequence], masks: _Masks | None) -> list[int]:
        """One token per row of `seqs`: the replies sample theirs (against their shadows' rows where
        contrasted), and each shadow is given its reply's."""
        logits = self._decode(seqs)
        replies = [i for i, s in enumerate(seqs) if s.shadow_of is None]
        if len(replies) == len(seqs):
            return self._sample(seqs, logits, masks)
        row = {id(s): i for i, s in enumerate(seqs)}
        without = {b: logits[row[id(seqs[i].shadow)]] for b, i in enumerate(replies) if seqs[i].shadow is not None}
        tokens = dict(zip(replies, self._sample([seqs[i] for i in replies], logits[replies], masks, without),
                          strict=True))
        return [tokens[i] if s.shadow_of is None else tokens[row[id(s.shadow_of)]] for i, s in enumerate(seqs)]

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        slots = [s.slot for s in seqs]
        if self.cuda_decoder is not None:
            return self.cuda_decoder.run([s.last_token for s in seqs], [s.num_computed for s in seqs], slots)
        tokens = torch.tensor([[s.last_token] for s in seqs])
        lora = LoraBatch(self.slots, slots, 1) if any(s >= 0 for s in slots) else None
        return self.model.forward(tokens, start=[s.num_computed for s in seqs], rows=list(range(len(seqs))),
                                  cache=self.cache, lora=lora)

    def _forward(self, seq: Sequence, tokens: Seq[int], start: int, all_logits: bool = False) -> torch.Tensor:
        """tokens at positions start.. of seq's staging row, under seq's adapter; logits [1, V] (or [1, T, V])."""
        lora = LoraBatch(self.slots, [seq.slot], len(tokens)) if seq.slot >= 0 else None
        return self.model.forward(torch.tensor([list(tokens)]), start=[start], rows=[self.staging_row_of(seq)],
                                  cache=self.cache, lora=lora, all_logits=all_logits)

    def _score(self, seq: Sequence, next_logits: torch.Tensor) -> list[list[float]]:
        """log p(token | context, earlier candidate tokens) for every token of every candidate, each from
        one log-softmax (so each is <= 0, and a candidate's score is their sum).

        The prompt's K/V fill the staging row below len(prompt), and `next_logits` [V] follow its last
        token. Candidates are scored one after another from that position on; each overwrites the last
        one's K/V, and the causal mask hides anything beyond the positions a call writes.
        """
        start = len(seq.prompt)
        first = torch.log_softmax(next_logits.float(), dim=-1)
        scores = []
        for candidate in seq.choices or ():
            values = [first[candidate[0]].item()]
            if len(candidate) > 1:
                logits = self._forward(seq, candidate[:-1], start, all_logits=True)[0]
                logp = torch.log_softmax(logits.float(), dim=-1)
                values += logp.gather(1, torch.tensor(candidate[1:], device=logp.device)[:, None])[:, 0].tolist()
            scores.append(values)
        return scores

    def _start_masks(self, seqs: list[Sequence]) -> _Masks | None:
        constrained = [s for s in seqs if s.matcher is not None]
        if not constrained:
            return None
        return _Masks({id(s): i for i, s in enumerate(constrained)},
                      self.grammars.start_masks([s.matcher for s in constrained]))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, masks: _Masks | None,
                without: dict[int, torch.Tensor] | None = None) -> list[int]:
        """Row b's token: its logit bias, then its grammar's mask, then its contrast with `without[b]` (the
        logits of its shadow, biased alike so that a bias counts once in (1 + w) log p - w log q), then
        sampling."""
        biased = [b for b, s in enumerate(seqs) if s.params.logit_bias]
        rows = [b for b, s in enumerate(seqs) if masks is not None and id(s) in masks.index]
        without = dict(without or {})
        if biased or rows or without:
            logits = logits.float().clone()
        for b in biased:
            ids, values = zip(*seqs[b].params.logit_bias, strict=True)
            bias = torch.tensor(values, dtype=logits.dtype, device=logits.device)
            logits[b, list(ids)] += bias
            if b in without:
                without[b] = without[b].float().clone()
                without[b][list(ids)] += bias
        if rows:  # the constrained rows' disallowed tokens go to -inf; free rows are left as they are
            bitmask = masks.bits.result()
            logits[rows] = self.grammars.apply(logits[rows], bitmask[[masks.index[id(seqs[b])] for b in rows]])
        for b, other in without.items():  # among the tokens the grammar allows
            logits[b] = contrasted(logits[b], other, seqs[b].params.contrast)
        penalized = any(s.params.repetition_penalty != 1.0 for s in seqs)
        return sample_batch(logits, [s.sampler for s in seqs], [s.history() for s in seqs] if penalized
                            else [[]] * len(seqs))
