"""Batched forward calls against one-sequence-at-a-time calls (the slow reference)."""

from __future__ import annotations

import torch

from sidecar.model.llama import KVCache, LlamaModel
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


def test_a_cache_that_grows_keeps_what_it_holds_and_decodes_as_one_allocated_whole(models, tokenizer):
    """The CPU cache starts at 256 positions and doubles when a row needs more (KVCache.reserve): a short
    sequence held before the growth, and a long prompt prefilled across it, decode as in a cache of the
    full length from the start."""
    model = models("fp32")
    short = tokenizer.encode_literal(PROMPTS[0])
    long = tokenizer.encode_literal(" ".join([PROMPTS[3], PROMPTS[1]] * 12))
    assert 256 < len(long) < 500
    runs = []
    for grow in (True, False):
        cache = KVCache(model.config, rows=3, max_len=1024, dtype=model.dtype, grow=grow)
        first = cache.capacity
        model.forward(torch.tensor([short[:-1]]), start=[0], rows=[0], cache=cache)
        for start in range(0, len(long) - 1, 100):  # chunked prefill, crossing 256
            chunk = long[start:min(start + 100, len(long) - 1)]
            model.forward(torch.tensor([chunk]), start=[start], rows=[1], cache=cache)
        tokens, lengths, steps = [short[-1], long[-1]], [len(short) - 1, len(long) - 1], []
        for _ in range(4):
            logits = model.forward(torch.tensor(tokens)[:, None], start=lengths, rows=[0, 1], cache=cache)
            steps.append(logits)
            tokens, lengths = [int(x) for x in logits.argmax(-1)], [n + 1 for n in lengths]
        runs.append((first, cache.capacity, steps))
    (grown_from, grown_to, grown), (whole_from, whole_to, whole) = runs
    assert (grown_from, grown_to) == (256, 512) and whole_from == whole_to == 1024
    for a, b in zip(grown, whole, strict=True):
        assert torch.allclose(a, b, atol=reordered_fp32(model.config.num_layers, b), rtol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_cache_grows_no_further_than_its_length(models):
    model = models("fp32")
    cache = KVCache(model.config, rows=1, max_len=300, dtype=model.dtype)
    cache.reserve(257)
    assert cache.capacity == 300
    try:
        cache.reserve(301)
    except ValueError as e:
        assert "301" in str(e) and "300" in str(e)
    else:
        raise AssertionError("reserve past max_len must fail")
