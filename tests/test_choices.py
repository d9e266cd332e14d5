"""Constrained choice (a reply's emotion): candidate log-probabilities against transformers."""

from __future__ import annotations

import pytest
import torch

from sidecar.config import EngineConfig
from sidecar.engine.api import EngineEvent, SamplingParams
from sidecar.engine.base_model import BaseModel
from sidecar.engine.llm_engine import LLMEngine
from sidecar.engine.tokenizer import ChatMessage

LABELS = ["gruff", "proud", "amused", "scornful", "sad"]


@pytest.fixture(scope="module")
def base(models, tokenizer, model_path) -> BaseModel:
    return BaseModel(model_path, models("fp32"), tokenizer)


def _context(tokenizer) -> list[int]:
    return tokenizer.encode_chat([
        ChatMessage("system", "You are Brynja, a gruff dwarven blacksmith."),
        ChatMessage("user", "Your swords are the finest in the land!"),
        ChatMessage("assistant", "Hmph. Aye, they are. Forty gold, lad."),
        ChatMessage("user", f"In one word, which feeling matches your last reply: {', '.join(LABELS)}?")])


def _choose(engine: LLMEngine, ids: list[int], candidates: list[list[int]], adapter=None) -> EngineEvent:
    events: list[EngineEvent] = []
    engine.add(engine.make_sequence(ids, adapter, SamplingParams(max_tokens=1), events.append, choices=candidates))
    while engine.has_work():
        engine.step()
    assert [e.kind for e in events] == ["started", "finished"], events
    return events[-1]


def test_candidate_logprobs_match_transformers(base, tokenizer, hf_model):
    ids = _context(tokenizer)
    candidates = [tokenizer.encode_literal(label) for label in LABELS]
    assert any(len(c) > 1 for c in candidates)  # multi-token labels take the scoring forward path
    event = _choose(LLMEngine(base, EngineConfig(max_batch=2)), ids, candidates)
    with torch.no_grad():
        for candidate, got, per_token in zip(candidates, event.choice_logprobs, event.choice_token_logprobs,
                                             strict=True):
            full = torch.tensor([ids + candidate])
            logp = torch.log_softmax(hf_model(full).logits[0].float(), dim=-1)
            want = [logp[len(ids) - 1 + i, t].item() for i, t in enumerate(candidate)]
            assert abs(got - sum(want)) < 1e-3, (candidate, got, want)
            # Each token's own value, from one log-softmax: never above 0 (echo reports these).
            assert len(per_token) == len(candidate) and all(v <= 0 for v in per_token), per_token
            assert per_token == pytest.approx(want, abs=1e-3) and sum(per_token) == pytest.approx(got, abs=1e-9)
    assert event.finish_reason == "choice" and event.choice == max(range(len(LABELS)),
                                                                   key=event.choice_logprobs.__getitem__)


def test_choice_with_adapter_and_full_batch(base, tokenizer, peft_reference):
    """Scored under the adapter, admitted even when every decode row is busy, and scored alike either way."""
    ref = LLMEngine(base, EngineConfig(max_batch=1)).load_adapter("alpha", peft_reference[1]["alpha"], "1")
    ids = _context(tokenizer)
    candidates = [tokenizer.encode_literal(label) for label in LABELS]
    alone = _choose(LLMEngine(base, EngineConfig(max_batch=1, prefix_cache_mb=0)), ids, candidates, ref)
    plain = _choose(LLMEngine(base, EngineConfig(max_batch=1, prefix_cache_mb=0)), ids, candidates)
    assert alone.choice_logprobs != plain.choice_logprobs  # the adapter is applied

    engine = LLMEngine(base, EngineConfig(max_batch=1))
    busy: list[EngineEvent] = []
    engine.add(engine.make_sequence(ids, None, SamplingParams(max_tokens=40, ignore_eos=True), busy.append))
    engine.step()  # the one decode row is taken
    scored: list[EngineEvent] = []
    engine.add(engine.make_sequence(ids, ref, SamplingParams(max_tokens=1), scored.append, choices=candidates))
    for _ in range(10):
        engine.step()
        if scored and scored[-1].kind == "finished":
            break
    assert scored[-1].kind == "finished" and busy[-1].kind != "finished"  # did not wait for the row
    assert all(abs(a - b) < 1e-3 for a, b in zip(scored[-1].choice_logprobs, alone.choice_logprobs, strict=True))
