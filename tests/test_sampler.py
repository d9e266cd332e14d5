"""Sampling against transformers' logits processors, and stop-string streaming."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sidecar.engine.api import SamplingParams
from sidecar.engine.output import StopStringFilter
from sidecar.engine.sampler import Sampler, apply_repetition_penalty, sampling_probs
from sidecar.errors import UserError

LOGITS = torch.randn(1, 500, generator=torch.Generator().manual_seed(0)) * 3


def test_repetition_penalty_matches_transformers():
    seen = [3, 17, 17, 250, 499]
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), LOGITS.clone())
    assert torch.allclose(apply_repetition_penalty(LOGITS[0], seen, 1.3), ref[0])


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 0, 1.0, 0.0), (1.0, 20, 1.0, 0.0), (1.2, 0, 0.8, 0.0),
                                                          (0.9, 50, 0.9, 0.0), (0.7, 0, 1.0, 0.05), (1.2, 0, 0.9, 0.2),
                                                          (1.0, 30, 1.0, 0.1)])
def test_sampling_distribution_matches_transformers_warpers(temperature, top_k, top_p, min_p):
    scores = TemperatureLogitsWarper(temperature)(None, LOGITS.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    ref = torch.softmax(scores, -1)[0]
    ours = sampling_probs(LOGITS[0], SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    assert torch.allclose(ours / ours.sum(), ref, atol=1e-6)
    if min_p:  # the filter removes something here, so the comparison above tests it
        assert (ours > 0).sum() < (sampling_probs(LOGITS[0], SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p)) > 0).sum()


def test_seed_reproducible_and_greedy_is_argmax():
    params = SamplingParams(temperature=1.0, seed=5)
    a, b = Sampler(params), Sampler(params)
    assert [a(LOGITS[0]) for _ in range(20)] == [b(LOGITS[0]) for _ in range(20)]
    assert Sampler(SamplingParams())(LOGITS[0]) == int(LOGITS[0].argmax())


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("temperature", -1.0), ("top_p", 0.0),
                                         ("top_p", float("inf")), ("top_k", -2), ("max_tokens", 0),
                                         ("repetition_penalty", 0.0), ("min_p", -0.1), ("min_p", 1.5),
                                         ("min_p", float("nan"))])
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


def test_min_p_comes_from_the_request_else_the_character(tmp_path):
    """generation.min_p is the character's default; a Talk's (or a scene's) options.min_p overrides it, 0 included."""
    from sidecar.config import RequestLimits
    from sidecar.dialogue.characters import Generation
    from sidecar.dialogue.scene import SceneInput
    from sidecar.dialogue.turn import TalkInput, sampling_params
    from sidecar.pb.npc.v1 import dialogue_pb2 as pb
    from sidecar.server.requests import parse_scene, parse_talk

    limits, character = RequestLimits(), Generation(temperature=0.7, min_p=0.2)
    unset = parse_talk(pb.TalkRequest(character_id="elf", player_line="Hi"), limits)
    assert unset.min_p is None and sampling_params(unset, character, limits).min_p == 0.2
    for value in (0.0, 0.05, 1.0):
        talk = parse_talk(pb.TalkRequest(character_id="elf", player_line="Hi",
                                         options=pb.GenerationOptions(min_p=value)), limits)
        assert sampling_params(talk, character, limits).min_p == pytest.approx(value)
    scene = parse_scene(pb.SceneRequest(character_ids=["a", "b"], situation="x",
                                             options=pb.GenerationOptions(min_p=0.1)), limits)
    assert isinstance(scene, SceneInput) and sampling_params(scene, character, limits).min_p == pytest.approx(0.1)
    assert sampling_params(TalkInput("elf", "", "Hi", {}, ""), Generation(), limits).min_p == 0.0
