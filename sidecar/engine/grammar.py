"""Grammar-constrained decoding for the torch engine, through llguidance (docs/bench/grammar_libraries.md
says why that library).

A request whose SamplingParams carry a grammar (Lark text, llguidance's dialect: `%json{...}` embeds a
JSON schema) gets a matcher. Each step, the matchers of the constrained rows fill one bitmask of
allowed tokens on a worker thread while the forward runs (llguidance drops the GIL), and the
runner sets the logits of every other token to -inf before sampling; free rows in the same batch
are untouched. After sampling, each matcher consumes its row's token (llm_engine).

The grammar's fixed opening (e.g. an emotion's "[") is not decoded step by step: its tokens are
appended to the prompt and prefilled with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np
import torch

from sidecar.engine.api import GrammarError
from sidecar.engine.tokenizer import Tokenizer


class Grammars:
    """The tokenizer as llguidance sees it, matchers, and the batch bitmask. The tokenizer takes ~0.2 s
    to build: it is built on the mask thread as soon as the engine starts, so neither the engine's
    construction nor (in practice) the first constrained request waits for it."""

    def __init__(self, tokenizer: Tokenizer, logits_width: int):
        self.logits_width = logits_width
        # One mask thread: on a small CPU, more would only take cores from the forward.
        self._executor = llguidance.LLExecutor(num_threads=max(1, min(4, (os.cpu_count() or 2) // 4)))
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="npc-grammar")
        self._lltok = self._worker.submit(
            lambda: llguidance.LLTokenizer(tokenizer.hf_json(), eos_token=list(tokenizer.eos_ids)))

    @property
    def lltok(self) -> llguidance.LLTokenizer:
        return self._lltok.result()

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start; raises GrammarError for a grammar that does not compile."""
        matcher = llguidance.LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"grammar: {matcher.get_error()}")
        return matcher

    def start_masks(self, matchers: Sequence[llguidance.LLMatcher]) -> Future[torch.Tensor]:
        """The allowed tokens of each matcher's next step, computed on the worker thread ([n, words] int32
        bits): call before the forward, take .result() after it."""
        words = (self.lltok.vocab_size + 31) // 32
        bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)

        def fill() -> torch.Tensor:
            self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                                   words * 4, len(matchers))
            return bitmask

        return self._worker.submit(fill)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """logits [n, V] with every token the bitmask forbids at -inf (a new float32 tensor). numpy's
        unpackbits is the fastest CPU unpacking measured (docs/bench/grammar_libraries.md)."""
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
        allowed = torch.from_numpy(bits).bool()
        width = logits.shape[-1]
        if allowed.shape[1] < width:  # logits wider than the tokenizer (padded embeddings): never those
            allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]), value=False)
        return logits.float().masked_fill(~allowed[:, :width].to(logits.device), float("-inf"))

    def close(self) -> None:
        """Ends the mask thread (after the step thread has stopped: no mask is pending)."""
        self._worker.shutdown(wait=True, cancel_futures=True)
