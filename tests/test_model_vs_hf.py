"""Our forward pass on the embedded SmolLM2 GGUF against transformers loading the same file."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sidecar.engine.api import SamplingParams
from sidecar.engine.tokenizer import ChatMessage
from sidecar.model.llama import LlamaModel
from sidecar.model.native import decode_attention_kernel, quant_gemm_kernel
from sidecar.model.quant import DenseLinear
from tests.conftest import engine_generate
from tests.rounding import U_BF16, reordered_fp32

PROMPTS = [
    "Once upon a time",
    "The blacksmith wiped his brow and said: 'Another sword? For you, stranger,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Les elfes de la forêt n'aiment pas les étrangers, surtout ceux qui",
    "1, 2, 3, 5, 8, 13, 21,",
]


def _our_logits(model, ids: list[int], hook=None) -> torch.Tensor:
    cache = model.new_cache(rows=1, max_len=len(ids))
    return model.forward(torch.tensor([ids]), start=[0], rows=[0], cache=cache, all_logits=True, lora=hook)[0]


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
    # room for difference is summation order inside kernels (tests/rounding.py; observed: 0).
    for ids, ref in reference:
        ours = _our_logits(models("fp32"), ids)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= reordered_fp32(models("fp32").config.num_layers, ref)


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


class _Rounding:
    """Stands in for a LoRA hook and adds no adapter: each projection's output y becomes y * (1 + r), r uniform
    in [-u, u]. A rounding to nearest errs uniformly within half a spacing, at most u of the value, so this is at
    least as large as rounding each output once; run on the fp32 model, it shows what such roundings do to this
    model's logits, identically on every CPU."""

    def __init__(self, u: float, seed: int = 0):
        self.u, self.gen = u, torch.Generator().manual_seed(seed)

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * (1 + self.u * (2 * torch.rand(y.shape, generator=self.gen) - 1))


def _mean_kl(reference, outputs: list[torch.Tensor]) -> float:
    """Mean over prompts of the mean KL(fp32 reference || output) per position."""
    kls = []
    for (_, ref), ours in zip(reference, outputs, strict=True):
        p, logq = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
        kls.append((p.exp() * (p - logq)).sum(-1).mean().item())
    return sum(kls) / len(kls)


@pytest.fixture(scope="module")
def rounding_kl(models, reference) -> float:
    """The KL that one bf16-sized rounding of every projection output costs this model on these prompts."""
    return _mean_kl(reference, [_our_logits(models("fp32"), ids, _Rounding(U_BF16)) for ids, _ in reference])


def _format_weights(w: torch.Tensor, weights: str) -> torch.Tensor:
    """A format's weights made from the fp32 ones by the format's definition, not by our kernels: bf16 rounds
    each weight; int8 rounds to 255 levels per output channel (symmetric, as quant.Int8Linear); the int4 grid
    is the Q4 one, so exactly the fp32 weights."""
    if weights == "bf16":
        return w.bfloat16().float()
    if weights == "int8":
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        return (w / scale).round().clamp(-127, 127) * scale
    return w


class _Int8Inputs(DenseLinear):
    """A float32 matrix whose input is first rounded as the native int4 kernel rounds it (each group of 32 to
    int8 steps of absmax / 127): the kernel's definition, computed in plain float32, not by the kernel."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.reshape(*x.shape[:-1], -1, 32)
        step = groups.abs().amax(-1, keepdim=True) / 127
        rounded = torch.where(step > 0, torch.round(groups / step.clamp_min(1e-30)).clamp(-127, 127) * step, 0)
        return super().__call__(rounded.reshape(x.shape))


def _fp32_with_format_weights(fp32: LlamaModel, weights: str, head: str | None = None,
                              int8_inputs: bool = False) -> LlamaModel:
    """The fp32 model holding what a format stores: its matrices (the head is int8 under int4 on the CPU, see
    llama.py) and, since every format computes in bf16, bf16 embeddings and norm weights. `int8_inputs`: the
    layer matrices also round their inputs as the native int4 kernel does."""
    def linear(dense: DenseLinear, fmt: str = weights) -> DenseLinear:
        return (_Int8Inputs if int8_inputs else DenseLinear)(_format_weights(dense.weight, fmt))

    def bf16(t: torch.Tensor) -> torch.Tensor:
        return _format_weights(t, "bf16")

    layers = [dataclasses.replace(x, attn_norm=bf16(x.attn_norm), qkv=linear(x.qkv), o=linear(x.o),
                                  ffn_norm=bf16(x.ffn_norm), gate_up=linear(x.gate_up), down=linear(x.down))
              for x in fp32.layers]
    head = DenseLinear(_format_weights(fp32.head.weight, head or ("int8" if weights == "int4" else weights)))
    return LlamaModel(fp32.config, layers, bf16(fp32.embed), bf16(fp32.norm), head, "fp32", torch.float32)


# Quantized formats compute in bf16. Their KL to fp32 is bounded by two parts, added as square roots (KL is
# about half the variance of the logit error under p, and standard deviations add at most linearly):
# - what the format stores (`_fp32_with_format_weights`, in fp32 arithmetic: the same on every CPU);
# - bf16 arithmetic: a layer rounds ~14 values to u = 2^-8 (2 norms, 3 in rope, attention, 4 projection
#   outputs, SiLU, product, 2 residual adds) where `_Rounding` rounds 4; twice that for the residual adds,
#   which round the whole residual stream, not a smaller update: BF16_ROUNDINGS x rounding_kl.
BF16_ROUNDINGS = 2 * 14 / 4


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_quantized_logits_close_to_fp32(models, reference, rounding_kl, weights):
    # int4 on a CPU with the native kernel (quant_gemm.c) also rounds each projection's input to int8 per group
    # of 32: part of what the format computes, so part of its first term (the KL measured 0.88 of the bound
    # without that term, 0.46 with it, as bf16 and int8 do; 2026-12-07)
    int8_inputs = weights == "int4" and quant_gemm_kernel() is not None
    fp32_weights = _fp32_with_format_weights(models("fp32"), weights, int8_inputs=int8_inputs)
    weights_kl = _mean_kl(reference, [_our_logits(fp32_weights, ids) for ids, _ in reference])
    max_kl = (math.sqrt(weights_kl) + math.sqrt(BF16_ROUNDINGS * rounding_kl)) ** 2
    outputs = [_our_logits(models(weights), ids) for ids, _ in reference]
    assert _mean_kl(reference, outputs) < max_kl, (weights_kl, rounding_kl)
    # A greedy token may change only at a near tie: a logit error of RMS sigma (KL ~ sigma^2 / 2) moves the
    # gap between two tokens by more than 4 standard deviations of a difference of two errors almost never.
    sigma = math.sqrt(2 * max_kl)
    for (_, ref), ours in zip(reference, outputs, strict=True):
        want, got = ref.argmax(-1), ours.argmax(-1)
        gap = (ref.gather(-1, want[:, None]) - ref.gather(-1, got[:, None]))[:, 0]
        assert (gap <= 4 * math.sqrt(2) * sigma).all(), (gap.max().item(), sigma)


def _decoded_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """The logits at every position as decoding computes them: the first token as a prompt, then a step a token."""
    cache = model.new_cache(rows=1, max_len=len(ids))
    out = [model.forward(torch.tensor([ids[:1]]), start=[0], rows=[0], cache=cache)]
    for pos in range(1, len(ids)):
        out.append(model.forward(torch.tensor([[ids[pos]]]), start=[pos], rows=[0], cache=cache))
    return torch.cat(out)


def test_decode_steps_logits_close_to_fp32(models, reference, rounding_kl):
    """bf16 decoded a token a step (on a CPU the native decode attention, model/native/attention.c): within the
    bf16 bound of the prompt forward's test."""
    model = models("bf16")
    assert (model._cpu_attention is not None) == (decode_attention_kernel() is not None)
    fp32_weights = _fp32_with_format_weights(models("fp32"), "bf16")
    weights_kl = _mean_kl(reference, [_our_logits(fp32_weights, ids) for ids, _ in reference])
    max_kl = (math.sqrt(weights_kl) + math.sqrt(BF16_ROUNDINGS * rounding_kl)) ** 2
    assert _mean_kl(reference, [_decoded_logits(model, ids) for ids, _ in reference]) < max_kl, (weights_kl,
                                                                                                   rounding_kl)


def test_a_decoded_row_does_not_depend_on_the_batch(models, reference):
    """int4 as served on a CPU (native matmuls and decode attention, each row on its own): rows of different
    lengths decoded together give each row the logits it gets decoded alone, bit for bit, so what one NPC says
    never depends on who else is speaking."""
    model = models("int4")
    prompts = [ids for ids, _ in reference[:3]]
    together = model.new_cache(rows=3, max_len=64)
    for row, ids in enumerate(prompts):
        model.forward(torch.tensor([ids]), start=[0], rows=[row], cache=together)
    steps = torch.tensor([[ids[-1]] for ids in prompts])
    batch = model.forward(steps, start=[len(ids) for ids in prompts], rows=[0, 1, 2], cache=together)
    for row, ids in enumerate(prompts):
        alone = model.new_cache(rows=1, max_len=64)
        model.forward(torch.tensor([ids]), start=[0], rows=[0], cache=alone)
        single = model.forward(steps[row: row + 1], start=[len(ids)], rows=[0], cache=alone)
        assert torch.equal(single[0], batch[row]), row


def test_prompt_copies_logits_close_to_fp32(checkpoint, models, reference, rounding_kl):
    """int4 with bf16 prompt copies (load_base_model's --prompt-weights): a whole prompt in one forward runs from
    the copies, which hold the Q4 grid rounded to bf16: bounded as bf16 weights with the int8 head."""
    model = LlamaModel.from_checkpoint(checkpoint, "int4")
    model.hold_prompt_copies()
    fp32_weights = _fp32_with_format_weights(models("fp32"), "bf16", head="int8")
    weights_kl = _mean_kl(reference, [_our_logits(fp32_weights, ids) for ids, _ in reference])
    max_kl = (math.sqrt(weights_kl) + math.sqrt(BF16_ROUNDINGS * rounding_kl)) ** 2
    assert _mean_kl(reference, [_our_logits(model, ids) for ids, _ in reference]) < max_kl, (weights_kl, rounding_kl)


def test_qk_weights_in_hugging_face_layout(checkpoint, hf_model):
    """After undoing llama.cpp's permutation, q/k rows are exactly transformers' q_proj/k_proj."""
    for i in (0, 17, 29):
        attn = hf_model.model.layers[i].self_attn
        assert torch.equal(checkpoint.tensor(f"layers.{i}.q").to_float(), attn.q_proj.weight)
        assert torch.equal(checkpoint.tensor(f"layers.{i}.k").to_float(), attn.k_proj.weight)
