"""Sampling against transformers' logits processors, and stop-string streaming."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from sidecar.engine.api import SamplingParams
from sidecar.engine.output import StopStringFilter
from sidecar.engine.sampler import Sampler, apply_repetition_penalty, sampling_probs
from sidecar.errors import UserError

LOGITS = torch.randn(1, 500, generator=torch.Generator().manual_seed(0)) * 3


def test_repetition_penalty_matches_transformers():
    seen = [3, 17, 17, 250, 499]
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), LOGITS.clone())
    assert torch.allclose(apply_repetition_penalty(LOGITS[0], seen, 1.3), ref[0])


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 20, 1.0), (1.2, 0, 0.8), (0.9, 50, 0.9)])
def test_sampling_distribution_matches_transformers_warpers(temperature, top_k, top_p):
    scores = TemperatureLogitsWarper(temperature)(None, LOGITS.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ref = torch.softmax(scores, -1)[0]
    ours = sampling_probs(LOGITS[0], SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.allclose(ours / ours.sum(), ref, atol=1e-6)


def test_seed_reproducible_and_greedy_is_argmax():
    params = SamplingParams(temperature=1.0, seed=5)
    a, b = Sampler(params), Sampler(params)
    assert [a(LOGITS[0]) for _ in range(20)] == [b(LOGITS[0]) for _ in range(20)]
    assert Sampler(SamplingParams())(LOGITS[0]) == int(LOGITS[0].argmax())


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("temperature", -1.0), ("top_p", 0.0),
                                         ("top_p", float("inf")), ("top_k", -2), ("max_tokens", 0),
                                         ("repetition_penalty", 0.0)])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(UserError, match=field):
        SamplingParams(**{field: value})


def test_stop_string_split_across_pieces_is_never_streamed():
    f = StopStringFilter(["\nPlayer:"])
    out = []
    for piece in ["Aye", ", lad.", "\nPla", "yer: more"]:
        text, hit = f.push(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Aye, lad." and hit
    g = StopStringFilter(["END"])
    assert g.push("the EN")[0] == "the " and g.push("ding")[0] == "ENding" and g.flush() == ""
