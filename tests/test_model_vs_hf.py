"""Our forward pass on the embedded SmolLM2 GGUF against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

from sidecar.engine.api import SamplingParams
from sidecar.engine.tokenizer import ChatMessage
from tests.conftest import engine_generate

PROMPTS = [
    "Once upon a time",
    "The blacksmith wiped his brow and said: 'Another sword? For you, stranger,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Les elfes de la forêt n'aiment pas les étrangers, surtout ceux qui",
    "1, 2, 3, 5, 8, 13, 21,",
]


def _our_logits(model, ids: list[int]) -> torch.Tensor:
    cache = model.new_cache(rows=1, max_len=len(ids))
    return model.forward(torch.tensor([ids]), start=[0], rows=[0], cache=cache, all_logits=True)[0]


@pytest.fixture(scope="module")
def reference(hf_model, tokenizer):
    """(ids, fp32 reference logits [T, V]) per prompt."""
    out = []
    for text in PROMPTS:
        ids = tokenizer.encode_raw_prompt(text)
        with torch.no_grad():
            out.append((ids, hf_model(torch.tensor([ids])).logits[0].float()))
    return out


def test_fp32_logits_match_transformers(models, reference):
    # Same fp32 weights (Q4_1/Q8_0 dequantized exactly) and the same op sequence, so the only
    # room for difference is summation order inside kernels: allow 1e-3 on logits of magnitude ~30
    # (observed: 0).
    for ids, ref in reference:
        ours = _our_logits(models("fp32"), ids)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-3


def test_greedy_continuations_token_identical_to_transformers(models, tokenizer, hf_model):
    for text in PROMPTS[:3]:
        ids = tokenizer.encode_raw_prompt(text)
        ours = engine_generate(models("fp32"), tokenizer, ids, SamplingParams(max_tokens=32))
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        eos = set(tokenizer.eos_ids)
        ref = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]  # we do not return EOS
        assert list(ours.token_ids) == ref


def test_chat_greedy_reply_identical_to_transformers(models, tokenizer, hf_model, hf_tokenizer):
    messages = [ChatMessage("system", "You are a gruff dwarven blacksmith."),
                ChatMessage("user", "Can you fix my axe?")]
    ids = tokenizer.encode_chat(messages)
    assert ids == hf_tokenizer.apply_chat_template([m.__dict__ for m in messages], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
    ours = engine_generate(models("fp32"), tokenizer, ids, SamplingParams(max_tokens=40))
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
    if ours.finish_reason == "stop":
        assert ref[len(ours.token_ids)] in tokenizer.eos_ids
    assert list(ours.token_ids) == ref[: len(ours.token_ids)]


# Quantized formats compute in bf16. Limits on the mean KL(fp32 || format) per position and on
# top-1 agreement, about 3x the values measured on these prompts (KL bf16 0.0019, int8 0.010 --
# int8 re-quantizes the Q4_1 weights per channel -- int4 0.0035; top-1 0.96 / 0.955 / 0.96).
QUANT_TOLERANCE = {"bf16": (0.006, 0.9), "int8": (0.03, 0.9), "int4": (0.01, 0.9)}


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_quantized_logits_close_to_fp32(models, reference, weights):
    max_kl, min_top1 = QUANT_TOLERANCE[weights]
    kls, agree = [], []
    for ids, ref in reference:
        ours = _our_logits(models(weights), ids)
        p, logq = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
        kls.append((p.exp() * (p - logq)).sum(-1).mean().item())
        agree.append((ours.argmax(-1) == ref.argmax(-1)).float().mean().item())
    assert sum(kls) / len(kls) < max_kl, kls
    assert sum(agree) / len(agree) > min_top1, agree


def test_qk_weights_in_hugging_face_layout(checkpoint, hf_model):
    """After undoing llama.cpp's permutation, q/k rows are exactly transformers' q_proj/k_proj."""
    for i in (0, 17, 29):
        attn = hf_model.model.layers[i].self_attn
        assert torch.equal(checkpoint.tensor(f"layers.{i}.q").to_float(), attn.q_proj.weight)
        assert torch.equal(checkpoint.tensor(f"layers.{i}.k").to_float(), attn.k_proj.weight)
