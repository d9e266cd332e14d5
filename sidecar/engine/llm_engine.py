"""The engine's step: schedule() -> run the model -> postprocess(). Synchronous and single-threaded;
AsyncEngine (engine.py) drives it from a background thread."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import torch

from sidecar.config import EngineConfig
from sidecar.engine.adapters import AdapterCache
from sidecar.engine.admission import check_request
from sidecar.engine.base_model import BaseModel
from sidecar.engine.choices import score_continuations
from sidecar.engine.kv_cache import PrefixCache
from sidecar.engine.sampler import SamplingParams, sample_batch
from sidecar.engine.scheduler import Scheduler, StepPlan
from sidecar.engine.sequence import AdapterRef, EngineEvent, Sequence
from sidecar.model.cuda import triton_available
from sidecar.model.lora import LoraBatch, LoraSlots

_ids = itertools.count()


class LLMEngine:
    def __init__(self, base: BaseModel, config: EngineConfig | None = None, progress: bool = False):
        self.base, self.config = base, config or EngineConfig()
        config, model = self.config, base.model
        self.cache = model.new_cache(rows=config.max_batch + 1, max_len=min(config.max_seq_len,
                                                                              model.config.max_position))
        self.prefix = PrefixCache(config.prefix_cache_mb * 2**20, config.prefix_block)
        # On CUDA the stacks start at rank 16: the Triton kernel pads smaller ranks to 16 anyway, and
        # growing the stacks means capturing the CUDA graphs again (a stall for every NPC).
        self.slots = LoraSlots(model.config, config.max_resident_adapters, model.dtype,
                               rank=16 if model.device.type == "cuda" else 8, device=model.device)
        self.adapters = AdapterCache(model.config, self.slots, config.max_rank)
        self.scheduler = Scheduler(config, self.cache, self.prefix, self.adapters)
        self.eos = set(base.tokenizer.eos_ids)
        self.steps = 0
        # On a GPU with Triton, decode steps run through CudaDecoder (captured graphs unless turned off).
        self.cuda_decoder = None
        if model.device.type == "cuda" and triton_available():
            from sidecar.engine.cuda_decode import CudaDecoder

            self.cuda_decoder = CudaDecoder(model, self.cache, self.slots, config.max_batch, config.cuda_graphs,
                                            progress=progress)
            if config.cuda_graphs:
                self.cuda_decoder.capture()

    # --- requests -----------------------------------------------------------------------------

    def make_sequence(self, prompt: list[int], adapter: AdapterRef | None, params: SamplingParams,
                      emit: Callable[[EngineEvent], None], request_id: str | None = None,
                      choices: list[list[int]] | None = None) -> Sequence:
        """Validates a request; raises UserError naming the problem.

        With `choices`, nothing is generated: the prompt is prefilled, each candidate continuation
        is scored, and the request finishes (reason "choice") with the most likely one's index.
        """
        room = check_request(prompt, choices, self.cache.max_len, self.base.model.config.vocab_size)
        return Sequence(request_id or f"req-{next(_ids)}", list(prompt), adapter, params, emit,
                        self.base.tokenizer.detokenizer(), max_tokens=min(params.max_tokens, room),
                        choices=tuple(tuple(c) for c in choices) if choices else None)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)  # raises QueueFull

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # --- the step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        plan = self.scheduler.schedule()
        if plan.decode:
            logits = self._run_decode(plan.decode)
            self._postprocess_decode(plan.decode, logits)
        if plan.prefill is not None:
            logits = self._run_prefill(plan)
            self._postprocess_prefill(plan.prefill, plan.prefill_range[1], logits)
        self.steps += 1

    def _run_decode(self, seqs: list[Sequence]) -> torch.Tensor:
        slots = [s.slot for s in seqs]
        if self.cuda_decoder is not None:
            return self.cuda_decoder.run([s.last_token for s in seqs], [s.num_computed for s in seqs], slots)
        tokens = torch.tensor([[s.last_token] for s in seqs])
        lora = LoraBatch(self.slots, slots, 1) if any(s >= 0 for s in slots) else None
        return self.base.model.forward(tokens, start=[s.num_computed for s in seqs], rows=list(range(len(seqs))),
                                       cache=self.cache, lora=lora)

    def _run_prefill(self, plan: StepPlan) -> torch.Tensor:
        seq, (lo, hi) = plan.prefill, plan.prefill_range
        lora = LoraBatch(self.slots, [seq.slot], hi - lo) if seq.slot >= 0 else None
        return self.base.model.forward(torch.tensor([seq.prompt[lo:hi]]), start=[lo],
                                       rows=[self.scheduler.staging_row], cache=self.cache, lora=lora)

    def _postprocess_decode(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = sample_batch(logits, [s.sampler for s in seqs], [s.history() for s in seqs]
                              if any(s.params.repetition_penalty != 1.0 for s in seqs) else [[]] * len(seqs))
        for seq in seqs:  # all first: finishing one may move another's row, and the move copies num_computed
            seq.num_computed += 1
        for seq, token in zip(seqs, tokens, strict=True):
            self._accept(seq, token)

    def _postprocess_prefill(self, seq: Sequence, hi: int, logits: torch.Tensor) -> None:
        seq.num_computed = hi
        if hi < len(seq.prompt):
            return
        if seq.choices is not None:
            return self._finish_choice(seq, logits[0])
        self.scheduler.prefill_done(seq)
        token = sample_batch(logits, [seq.sampler], [seq.history()])[0]
        self._accept(seq, token)

    def _accept(self, seq: Sequence, token: int) -> None:
        """Appends a sampled token, streams its text, and ends the sequence when it is done."""
        if not seq.first_token:
            seq.first_token = time.perf_counter()
        if token in self.eos and not seq.params.ignore_eos:
            return self._finish(seq, "stop")
        seq.output.append(token)
        seq.pending_ids.append(token)
        text, hit_stop = seq.stops.push(seq.detokenizer.push(token))
        if text:
            self._emit_delta(seq, text)
        if hit_stop:
            return self._finish(seq, "stop", stop_string=True)
        if len(seq.output) >= seq.max_tokens:
            return self._finish(seq, "length")

    def _emit_delta(self, seq: Sequence, text: str) -> None:
        seq.text += text
        seq.emit(EngineEvent("delta", seq.request_id, text=text, token_ids=tuple(seq.pending_ids)))
        seq.pending_ids.clear()

    def _finish(self, seq: Sequence, reason: str, stop_string: bool = False) -> None:
        if not stop_string:  # release held-back text (it may still complete a stop string)
            tail, hit = seq.stops.push(seq.detokenizer.flush())
            tail += "" if hit else seq.stops.flush()
            if tail:
                self._emit_delta(seq, tail)
        self.scheduler.finish(seq)
        seq.emit(EngineEvent("finished", seq.request_id, text=seq.text, token_ids=tuple(seq.output),
                             finish_reason=reason, prompt_tokens=len(seq.prompt), cached_tokens=seq.cached_tokens,
                             completion_tokens=len(seq.output), **seq.timing_fields()))

    def _finish_choice(self, seq: Sequence, next_logits: torch.Tensor) -> None:
        """Scores the candidates in the staging row, where the prompt's K/V are, then frees it."""
        def lora_for(tokens: int) -> LoraBatch | None:
            return LoraBatch(self.slots, [seq.slot], tokens) if seq.slot >= 0 else None

        scores = score_continuations(self.base.model, self.cache, self.scheduler.staging_row, len(seq.prompt),
                                     next_logits, seq.choices, lora_for)
        self.scheduler.finish(seq)
        seq.emit(EngineEvent("finished", seq.request_id, finish_reason="choice", prompt_tokens=len(seq.prompt),
                             cached_tokens=seq.cached_tokens, choice=max(range(len(scores)), key=scores.__getitem__),
                             choice_logprobs=tuple(scores), **seq.timing_fields()))

    # --- control ------------------------------------------------------------------------------

    def abort(self, seq: Sequence) -> None:
        """Marks a sequence cancelled; the next step removes it and frees its row (within one step)."""
        seq.cancelled = True

    def fail_active(self, message: str) -> int:
        """Ends every sequence of the current batch with an internal error (after a failed step);
        the waiting ones keep their place. Returns how many ended."""
        s = self.scheduler
        active = [*s.running, *([s.prefilling] if s.prefilling else [])]
        for seq in active:
            s.finish(seq)
            seq.emit(EngineEvent("error", seq.request_id, finish_reason="error", error=message, internal=True,
                                 prompt_tokens=len(seq.prompt), **seq.timing_fields()))
        return len(active)

    def stats(self) -> dict[str, object]:
        s = self.scheduler
        return {"active_sequences": len(s.running) + (1 if s.prefilling else 0), "waiting_requests": len(s.waiting),
                "resident_adapters": self.adapters.resident(), "prefix_hits": self.prefix.hits,
                "prefix_lookups": self.prefix.lookups, "steps": self.steps,
                "prefix_cache_bytes": self.prefix.used, "prefix_cache_capacity_bytes": self.prefix.capacity}

    def shutdown(self) -> None:
        self.adapters.shutdown()
