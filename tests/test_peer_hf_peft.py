"""The transformers + PEFT bench peer: its mixed-adapter batch must decode what each adapter alone decodes.

Otherwise the peer's tokens/s would be measured on a computation that is not the one it claims.
"""

from __future__ import annotations

import pytest
import torch

from sidecar.bench.agreement import compare, gap_summary
from sidecar.bench.multi_npc import _sidecar
from sidecar.bench.peer_hf_peft import generate_hf_peft, load_hf_peft, score_hf_peft
from sidecar.bench.workload import ADAPTER_STD
from sidecar.model.random_adapter import write_random_adapter

pytestmark = pytest.mark.slow  # loads its own transformers model (PEFT modifies it in place): ~20 s

# Different lengths, so rows are left-padded by different amounts.
PROMPTS = ["Once upon a time", "The blacksmith wiped his brow and said: 'Another sword? For you,", "1, 2, 3, 5,"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def adapter_dirs(checkpoint, tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("adapters")
    # std 0.05 (the bench's ADAPTER_STD) makes every adapter change the base model's greedy continuation
    # (checked below).
    return [write_random_adapter(root / f"npc{i}", checkpoint.config, seed=100 + i, std=ADAPTER_STD)
            for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def peft_model(model_path, adapter_dirs):
    return load_hf_peft(model_path, adapter_dirs)


def _greedy(model, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_mixed_adapter_batch_matches_each_adapter_alone(peft_model, tokenizer):
    prompts = [tokenizer.encode_literal(text) for text in PROMPTS]
    timings, mixed = generate_hf_peft(peft_model, prompts, NEW_TOKENS)

    for i, ids in enumerate(prompts):
        peft_model.set_adapter(f"npc{i}")  # plain single-adapter forward, batch of one, no padding
        alone = _greedy(peft_model, ids)
        with peft_model.disable_adapter():
            base = _greedy(peft_model, ids)
        assert mixed[i] == alone, f"row {i}"
        assert alone != base, f"adapter npc{i} does not change the output; the comparison proves nothing"

    assert len(timings) == len(prompts)
    for t in timings:
        assert len(t.token_times) == NEW_TOKENS
        assert t.submitted < t.token_times[0]
        assert t.token_times == sorted(t.token_times)


def test_scoring_verifies_the_sidecar_and_rejects_it_without_adapters_or_with_garbage(
        peft_model, adapter_dirs, model_path, tokenizer):
    """The multi-NPC bench's token check end to end, on real replies: the sidecar's tokens (int4, bf16)
    scored by this float32 peer pass; the same engine without the adapters, and garbage, fail."""
    import asyncio

    prompts = [tokenizer.encode_literal(text) for text in PROMPTS]
    steps = 16
    _, peer_ids = generate_hf_peft(peft_model, prompts, steps)
    assert score_hf_peft(peft_model, prompts, peer_ids) == [[0.0] * steps] * len(prompts)  # its own choices

    runs = {"npc-sidecar": asyncio.run(_sidecar(model_path, adapter_dirs, prompts, steps))["token_ids"],
            "npc-sidecar-no-lora": asyncio.run(_sidecar(model_path, None, prompts, steps))["token_ids"],
            "garbage": [[1000 + 7 * i for i in range(steps)]] * len(prompts)}
    scores = {system: [gap_summary(g) for g in score_hf_peft(peft_model, prompts, ids)] for system, ids in runs.items()}

    def verdict(sidecar: str) -> dict:
        results = [{"system": "npc-sidecar", "n": 3, "token_ids": runs[sidecar]},
                   {"system": "npc-sidecar-no-lora", "n": 3, "token_ids": runs["npc-sidecar-no-lora"]},
                   {"system": "hf-peft", "n": 3, "token_ids": peer_ids,
                    "scores": {"npc-sidecar": scores[sidecar], "npc-sidecar-no-lora": scores["npc-sidecar-no-lora"]}}]
        (entry,) = compare(results)
        return entry

    good = verdict("npc-sidecar")
    assert good["verified"], good
    assert not good["control"]["agrees"], good["control"]  # the adapters matter more than a near-tie
    for broken in ("npc-sidecar-no-lora", "garbage"):
        entry = verdict(broken)
        assert not entry["verified"] and not entry["sidecar"]["agrees"], (broken, entry)
