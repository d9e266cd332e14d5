"""The torch engine's step: schedule() -> runner.run(plan) -> postprocess(). Synchronous and
single-threaded; AsyncEngine (engine.py) drives it from a background thread.

The scheduler decides, the runner computes, and only postprocess() turns the step's token ids
into events (through each sequence's RequestOutput) and tells the scheduler who is done.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from sidecar.config import EngineConfig
from sidecar.engine.adapters import AdapterCache, read_adapter
from sidecar.engine.admission import check_request
from sidecar.engine.api import AdapterRef, EngineEvent, EngineStats, SamplingParams, Timings
from sidecar.engine.base_model import BaseModel
from sidecar.engine.grammar import Grammars
from sidecar.engine.kv_cache import KvRows, PrefixCache
from sidecar.engine.model_runner import ModelRunner, StepResult
from sidecar.engine.output import RequestOutput
from sidecar.engine.scheduler import Scheduler, StepPlan
from sidecar.engine.sequence import Sequence as Seq
from sidecar.errors import UserError
from sidecar.model.lora import LoraSlots

_ids = itertools.count()


def _nobody(event: EngineEvent) -> None:
    """A shadow's events: it never sends any (its reply speaks for both)."""


class LLMEngine:
    def __init__(self, base: BaseModel, config: EngineConfig | None = None, progress: bool = False):
        self.base, self.config = base, config or EngineConfig()
        config, model = self.config, base.model
        cache = model.new_cache(rows=config.max_batch + KvRows.ROWS_BEYOND_BATCH,
                                max_len=min(config.max_seq_len, model.config.max_position))
        self.kv = KvRows(cache, config.max_batch, PrefixCache(config.prefix_cache_mb * 2**20, config.prefix_block))
        # On CUDA the stacks start at rank 16: the Triton kernel pads smaller ranks to 16 anyway, and
        # growing the stacks means capturing the CUDA graphs again (a stall for every NPC). On the CPU
        # they are allocated at the first adapter's rank (none held before, no copy then).
        slots = LoraSlots(model.config, config.max_resident_adapters, model.dtype,
                          rank=16 if model.device.type == "cuda" else 0, device=model.device)
        self.adapters = AdapterCache(slots)
        self.scheduler = Scheduler(config, self.kv, self.adapters)
        self.grammars = Grammars(base.tokenizer, model.config.vocab_size)
        self.runner = ModelRunner(model, cache, slots, self.kv.staging_row_of, config, self.grammars, progress)
        self.steps = 0
        self.snapshot = EngineStats()  # replaced after each step: what stats() reads from other threads

    # --- requests -----------------------------------------------------------------------------

    def load_adapter(self, name: str, path, version: str, scale: float = 1.0) -> AdapterRef:
        """Reads and validates a PEFT folder against this base model (any thread); raises AdapterError."""
        return read_adapter(self.base.model.config, self.config.max_rank, name, path, version, scale,
                            self.base.model.dtype)

    def make_sequence(self, prompt: Sequence[int], adapter: AdapterRef | None, params: SamplingParams,
                      emit: Callable[[EngineEvent], None], request_id: str | None = None,
                      choices: Sequence[Sequence[int]] | None = None, timings: Timings | None = None,
                      background: bool = False) -> Seq:
        """Validates a request; raises UserError naming the problem.

        With `choices`, nothing is generated: the prompt is prefilled, each candidate continuation is
        scored, and the request finishes (reason "choice") with the most likely one's index.
        """
        matcher, forced = None, []
        if params.grammar is not None:
            if choices is not None:
                raise UserError("a scoring request (choices) takes no grammar")
            matcher = self.grammars.matcher(params.grammar)
            # The grammar's fixed opening is prefilled with the prompt rather than decoded a step at a time.
            forced = matcher.compute_ff_tokens()
            if forced and not matcher.consume_tokens(forced):
                raise UserError(f"grammar: {matcher.get_error()}")
        max_len, vocab = self.kv.cache.max_len, self.base.model.config.vocab_size
        room = check_request([*prompt, *forced], choices, max_len, vocab)
        shadow_prompt = None
        if params.contrast is not None:
            if choices is not None:
                raise UserError("a scoring request (choices) takes no contrast")
            if self.config.max_batch < 2:
                raise UserError("contrast: a reply and its shadow need two rows of the batch (max_batch >= 2)")
            shadow_prompt = [*params.contrast.prompt_without, *forced]
            room = min(room, check_request(shadow_prompt, None, max_len, vocab))  # both rows hold the reply
        if adapter is not None and adapter.loaded is None:
            raise UserError(f"adapter {adapter.name!r}: not loaded (make refs with Engine.load_adapter)")
        if any(token >= self.base.model.config.vocab_size for token, _ in params.logit_bias):
            raise UserError(f"logit_bias: token ids must be below the vocabulary size "
                            f"({self.base.model.config.vocab_size})")
        request_id = request_id or f"req-{next(_ids)}"
        tok = self.base.tokenizer
        out = RequestOutput(request_id, len(prompt), params, min(params.max_tokens, room + len(forced)),
                            tok.detokenizer(), tok.eos_ids, timings or Timings(), forced=forced)
        seq = Seq(request_id, [*prompt, *forced], adapter, params, emit, out,
                  choices=tuple(tuple(c) for c in choices) if choices else None, matcher=matcher,
                  background=background)
        if shadow_prompt is not None:
            seq.shadow = Seq(f"{request_id}/contrast", shadow_prompt, None, params, _nobody, out, shadow_of=seq)
        return seq

    def add(self, seq: Seq) -> None:
        self.scheduler.add(seq)  # raises QueueFull

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # --- the step -----------------------------------------------------------------------------

    def step(self) -> None:
        plan = self.scheduler.schedule()
        self._announce(plan)
        result = self.runner.run(plan)
        self._postprocess(plan, result)
        self.steps += 1
        self.snapshot = self._stats()

    def _announce(self, plan: StepPlan) -> None:
        """Tells clients what the scheduler did before the forward: cancelled ones end, an admitted one starts."""
        for seq in plan.cancelled:
            seq.send(seq.out.cancel())
        if plan.admitted is not None:
            plan.admitted.emit(plan.admitted.out.started(plan.admitted.cached_tokens))

    def _postprocess(self, plan: StepPlan, result: StepResult) -> None:
        for seq in plan.decode:  # all first: finishing one moves another's row, and the move copies num_computed
            seq.num_computed += 1
        for seq, token in zip(plan.decode, result.decode_tokens, strict=True):
            if seq.shadow_of is None:  # a shadow shares its reply's output: it has the token already
                self._accept(seq, token)
        seq = plan.prefill
        if seq is None:
            return
        seq.num_computed = plan.prefill_range[1]
        if result.token_logprobs is not None:
            self.scheduler.finish(seq)
            seq.emit(seq.out.choice(result.token_logprobs))
        elif result.shadow_logits is not None:
            seq.first_logits = result.shadow_logits
            self.scheduler.prefill_done(seq)
        elif result.first_token is not None:
            self.scheduler.prefill_done(seq)
            if seq.shadow is not None:
                seq.shadow.first_logits = None
            self._accept(seq, result.first_token)

    def _accept(self, seq: Seq, token: int) -> None:
        """Streams a sampled token's events; a finished reply leaves the batch."""
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            # The mask allowed only tokens the grammar accepts: reaching this is a bug, not bad input.
            self.scheduler.finish(seq)
            seq.emit(seq.out.error(f"grammar refused token {token}: {seq.matcher.get_error()}", internal=True))
            return
        events = seq.out.tokens([token])
        if seq.out.finished:
            self.scheduler.finish(seq)
        seq.send(events)

    # --- control ------------------------------------------------------------------------------

    def abort(self, seq: Seq) -> None:
        """Marks a sequence cancelled; the next step removes it and frees its row (within one step)."""
        seq.cancelled = True

    def fail_active(self, message: str) -> int:
        """Ends every sequence of the current batch with an internal error (after a failed step);
        the waiting ones keep their place. Returns how many ended."""
        active = self.scheduler.active()
        for seq in active:
            self.scheduler.finish(seq)
            seq.emit(seq.out.error(message, internal=True))
        self.snapshot = self._stats()
        return len(active)

    def stats(self) -> EngineStats:
        """The snapshot taken after the last step (safe to read from any thread)."""
        return self.snapshot

    def _stats(self) -> EngineStats:
        s, prefix = self.scheduler, self.kv.prefix
        return EngineStats(active_sequences=len(s.active()), waiting_requests=len(s.waiting),
                           batch_rows_in_use=s.rows_in_use(), kv_cache_bytes=self.kv.cache.nbytes(),
                           resident_adapters=self.adapters.resident(), prefix_cache_bytes=prefix.used,
                           prefix_cache_capacity_bytes=prefix.capacity, prefix_hits=prefix.hits,
                           prefix_lookups=prefix.lookups, steps=self.steps)
