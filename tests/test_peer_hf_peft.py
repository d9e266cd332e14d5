"""The transformers + PEFT bench peer: its mixed-adapter batch must decode what each adapter alone decodes.

Otherwise the peer's tokens/s would be measured on a computation that is not the one it claims.
"""

from __future__ import annotations

import pytest
import torch

from sidecar.bench.peer_hf_peft import generate_hf_peft, load_hf_peft
from sidecar.bench.workload import write_random_adapter

pytestmark = pytest.mark.slow  # loads its own transformers model (PEFT modifies it in place): ~20 s

# Different lengths, so rows are left-padded by different amounts.
PROMPTS = ["Once upon a time", "The blacksmith wiped his brow and said: 'Another sword? For you,", "1, 2, 3, 5,"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def peft_model(model_path, checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    # std 0.05 makes every adapter change the base model's greedy continuation (checked below).
    dirs = [write_random_adapter(root / f"npc{i}", checkpoint.config, seed=100 + i, std=0.05)
            for i in range(len(PROMPTS))]
    return load_hf_peft(model_path, dirs)


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
