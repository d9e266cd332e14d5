"""Batched forward calls against one-sequence-at-a-time calls (the slow reference)."""

from __future__ import annotations

import torch

from sidecar.model.llama import LlamaModel
from tests.rounding import reordered_fp32

PROMPTS = ["Hello there, traveller.", "The dragon sleeps beneath the mountain and dreams of gold",
           "Why?", "A long time ago in a quiet village by the sea, a fisherman found a bottle"]


def _single(model, tokenizer, text: str, extra: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy-decodes `extra` tokens alone; returns the ids and the logits of each step."""
    ids = tokenizer.encode_literal(text)
    cache = model.new_cache(rows=1, max_len=len(ids) + extra + 1)
    logits = model.forward(torch.tensor([ids]), start=[0], rows=[0], cache=cache)[0]
    steps = [logits]
    for _ in range(extra):
        ids.append(int(logits.argmax()))
        logits = model.forward(torch.tensor([[ids[-1]]]), start=[len(ids) - 1], rows=[0], cache=cache)[0]
        steps.append(logits)
    return ids, steps


def test_batched_decode_of_different_lengths_matches_single(models, tokenizer):
    model = models("fp32")
    extra = 6
    singles = [_single(model, tokenizer, t, extra) for t in PROMPTS]
    prompts = [tokenizer.encode_literal(t) for t in PROMPTS]
    # Non-contiguous cache rows, to exercise the gather path as well.
    rows = [5, 1, 3, 0]
    cache = model.new_cache(rows=6, max_len=max(map(len, prompts)) + extra + 1)
    for p, row in zip(prompts, rows, strict=True):  # prefill each prompt into its own row
        model.forward(torch.tensor([p[:-1]]), start=[0], rows=[row], cache=cache)
    lengths = [len(p) - 1 for p in prompts]
    tokens = [p[-1] for p in prompts]
    for step in range(extra + 1):
        logits = model.forward(torch.tensor(tokens)[:, None], start=lengths, rows=rows, cache=cache)
        for b, (ids, ref_steps) in enumerate(singles):
            # same fp32 ops, other GEMM blockings: only the order of the sums differs
            tolerance = reordered_fp32(model.config.num_layers, ref_steps[step])
            assert torch.allclose(logits[b], ref_steps[step], atol=tolerance, rtol=0), (b, step)
            if step < extra:
                assert int(logits[b].argmax()) == ids[len(prompts[b]) + step]
        tokens = [int(x) for x in logits.argmax(-1)]
        lengths = [n + 1 for n in lengths]


def test_chunked_prefill_matches_whole_prefill(models, tokenizer):
    model = models("fp32")
    ids = tokenizer.encode_literal(PROMPTS[3] + " " + PROMPTS[1])
    whole = model.forward(torch.tensor([ids]), start=[0], rows=[0], cache=model.new_cache(1, len(ids)),
                          all_logits=True)[0]
    cache = model.new_cache(1, len(ids))
    chunks, start, out = [7, 5, len(ids) - 12], 0, []
    for n in chunks:
        out.append(model.forward(torch.tensor([ids[start:start + n]]), start=[start], rows=[0], cache=cache,
                                 all_logits=True)[0])
        start += n
    # a chunk's queries meet the cached keys in other matmul shapes: only the order of the sums differs
    assert torch.allclose(torch.cat(out), whole, atol=reordered_fp32(model.config.num_layers, whole), rtol=0)


def test_batched_prefill_of_equal_prompts_matches_single(checkpoint, tokenizer):
    """The int4 weights (the default) batched: run with fp32 activations, where the int4 kernel is the same
    repacked Q4 codes and only the order of fp32 sums may differ, so the bound comes from fp32 rounding (bf16
    activations would round every op to 8 bits, by amounts that differ between CPUs' bf16 kernels)."""
    model = LlamaModel.from_checkpoint(checkpoint, "int4", torch.float32)
    ids = tokenizer.encode_literal(PROMPTS[1])
    one = model.forward(torch.tensor([ids]), start=[0], rows=[0], cache=model.new_cache(1, len(ids)))
    four = model.forward(torch.tensor([ids] * 4), start=[0] * 4, rows=[0, 1, 2, 3], cache=model.new_cache(4, len(ids)))
    assert torch.allclose(four, one.expand(4, -1), atol=reordered_fp32(model.config.num_layers, one), rtol=0)
