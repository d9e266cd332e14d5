"""Our LoRA path on the embedded model against transformers + PEFT with the same adapter folders."""

from __future__ import annotations

import pytest
import torch

from sidecar.engine.api import SamplingParams
from sidecar.model.lora import LoraBatch, LoraSlots, load_peft_adapter
from tests.conftest import PEFT_ADAPTERS, engine_generate

PROMPT = "The innkeeper leaned over the counter and whispered that the old mill"


@pytest.mark.parametrize("name", list(PEFT_ADAPTERS))
def test_logits_with_adapter_match_peft(models, checkpoint, tokenizer, peft_reference, name):
    peft_model, folders = peft_reference
    model = models("fp32")
    adapter = load_peft_adapter(folders[name], checkpoint.config)
    slots = LoraSlots(checkpoint.config, num_slots=3, dtype=torch.float32)
    slots.load(2, adapter)
    ids = tokenizer.encode_raw_prompt(PROMPT)
    ours = model.forward(torch.tensor([ids]), start=[0], rows=[0], cache=model.new_cache(1, len(ids)),
                         all_logits=True, lora=LoraBatch(slots, [2], len(ids)))[0]
    peft_model.set_adapter(name)
    with torch.no_grad():
        ref = peft_model(torch.tensor([ids])).logits[0]
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base(torch.tensor([ids])).logits[0]
    assert (ref - plain).abs().max() > 0.5  # the adapter really changes the output
    # fp32 on both sides; the scale is folded into B here, so allow float rounding only.
    assert (ours - ref).abs().max().item() < 2e-3


def test_greedy_with_adapter_identical_to_peft(models, checkpoint, tokenizer, peft_reference):
    peft_model, folders = peft_reference
    ids = tokenizer.encode_raw_prompt(PROMPT)
    ours = engine_generate(models("fp32"), tokenizer, ids, SamplingParams(max_tokens=24, ignore_eos=True),
                           folders["alpha"])
    peft_model.set_adapter("alpha")
    with torch.no_grad():
        ref = peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
    eos = set(tokenizer.eos_ids)
    ref = ref.tolist()
    ref = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    assert list(ours.token_ids[: len(ref)]) == ref
