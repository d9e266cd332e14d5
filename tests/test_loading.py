"""Loading GGUF files of every supported tensor type and Hugging Face folders, against transformers.

The files are small random Llamas written here (tests/tiny.py); each has a transformers twin
holding exactly the weights the file encodes. Logits must agree at fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sidecar.errors import ModelFileError
from sidecar.model.checkpoint import load_checkpoint
from sidecar.model.llama import LlamaModel
from sidecar.model.native import quant_gemm_kernel
from tests.tiny import VOCAB, tiny_gguf, tiny_hf_folder

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


def _compare(path: Path, hf, length: int = 48, weights: str = "fp32") -> float:
    ids = torch.from_numpy(np.random.default_rng(7).integers(0, VOCAB, size=(1, length)))
    model = LlamaModel.from_checkpoint(load_checkpoint(path), weights)
    ours = model.forward(ids, start=[0], rows=[0], cache=model.new_cache(1, length), all_logits=True)[0]
    with torch.no_grad():
        ref = hf(ids).logits[0]
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                                  "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_tensor_types_match_transformers(tmp_path, kind):
    hf = tiny_gguf(tmp_path / "m.gguf", kind)
    assert _compare(tmp_path / "m.gguf", hf) < 1e-5


# Relative RMS error of a re-quantized weight, from the formats (rounding to a grid of step s errs uniformly,
# RMS s / sqrt(12)), for these Gaussian weights: 4-bit min/max over groups of 32, s = range / 15 with a range
# of ~4.1 sigma, ~8%; int8 per channel of 256, s = 2 max|w| / 254 with max|w| ~3.0 sigma, ~0.7%; bf16, half a
# spacing of 8 bits uniformly, ~0.17%. No CPU arithmetic enters (elementwise rounding of seeded weights).
@pytest.mark.parametrize("weights,limit", [("int4", 0.1), ("int8", 0.01), ("bf16", 0.003)])
@pytest.mark.parametrize("kind", ["Q8_0", "Q6_K"])
def test_other_sources_requantized_within_format_error(tmp_path, kind, weights, limit):
    hf = tiny_gguf(tmp_path / "m.gguf", kind)
    model = LlamaModel.from_checkpoint(load_checkpoint(tmp_path / "m.gguf"), weights)
    mlp = hf.model.layers[1].mlp
    ref = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
    got = model.layers[1].gate_up.dequantized()
    assert ((got - ref).norm() / ref.norm()).item() < limit


@pytest.mark.parametrize("weights", ["auto", "int4", "int8"])
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K"])
def test_quantized_embedding_stays_in_its_blocks(tmp_path, kind, weights):
    """Quantized weights on the CPU hold a quantized embedding as its stored blocks (shared with a tied head
    kept as stored): a lookup gives the dense table's rows exactly, for any shape of tokens; float weights keep
    the dense table."""
    from sidecar.model.quant import BlockEmbedding, BlockLinear

    tiny_gguf(tmp_path / "m.gguf", "Q4_0", embed_kind=kind)
    ckpt = load_checkpoint(tmp_path / "m.gguf")
    model = LlamaModel.from_checkpoint(ckpt, weights)
    assert isinstance(model.embed, BlockEmbedding)
    table = ckpt.tensor("embed").to_float().bfloat16()
    tokens = torch.tensor([[5, 0, VOCAB - 1, 5], [7, 7, 300, 1]])
    assert torch.equal(model.embed(tokens), table[tokens])
    assert torch.equal(model.embed(tokens[:, :1]), table[tokens[:, :1]])
    assert model.embed.blocks.numel() < table.numel() * 2  # fewer bytes than the bf16 table
    if isinstance(model.head, BlockLinear):
        assert model.embed.blocks is model.head.blocks  # tied: one copy
    assert isinstance(LlamaModel.from_checkpoint(ckpt, "bf16").embed, torch.Tensor)


@pytest.mark.parametrize("kind", ["F32", "Q4_K", "Q8_0"])
def test_qwen2_gguf_matches_transformers(tmp_path, kind):
    """Qwen2: q/k/v biases, rows stored unpermuted, its own rope base and norm epsilon."""
    hf = tiny_gguf(tmp_path / "m.gguf", kind, arch="qwen2")
    config = load_checkpoint(tmp_path / "m.gguf").config
    assert (config.architecture, config.qkv_bias, config.rope_theta) == ("qwen2", True, 1e6)
    assert config.rms_eps == pytest.approx(1e-6)  # stored as float32
    assert _compare(tmp_path / "m.gguf", hf) < 1e-5


def test_qwen2_hugging_face_folder_matches_transformers(tmp_path):
    hf = tiny_hf_folder(tmp_path, arch="qwen2")
    assert load_checkpoint(tmp_path).config.qkv_bias
    assert _compare(tmp_path, hf) < 1e-5


def test_gguf_llama3_rope_frequencies(tmp_path):
    """Llama 3.1 GGUFs carry `rope_freqs.weight`; positions past the original context must match."""
    hf = tiny_gguf(tmp_path / "m.gguf", "F32", rope_parameters=LLAMA3_ROPE)
    assert load_checkpoint(tmp_path / "m.gguf").config.rope_scaling.kind == "freq_factors"
    assert _compare(tmp_path / "m.gguf", hf, length=300) < 1e-5


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE, LINEAR_ROPE], ids=["default", "llama3", "linear"])
def test_hugging_face_folder_matches_transformers(tmp_path, rope):
    hf = tiny_hf_folder(tmp_path, rope_parameters=rope)
    assert _compare(tmp_path, hf, length=300) < 1e-5


def test_hugging_face_bf16_folder(tmp_path):
    hf = tiny_hf_folder(tmp_path, dtype=torch.bfloat16)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.tensor("layers.0.q").kind == "BF16"
    assert _compare(tmp_path, hf) < 1e-5


def test_hugging_face_folder_refuses_pickles(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelFileError, match="pickled"):
        load_checkpoint(tmp_path)


def test_unsupported_architecture_named(tmp_path):
    tiny_gguf(tmp_path / "m.gguf", "F32", arch="falcon")
    with pytest.raises(ModelFileError, match="unsupported architecture 'falcon'"):
        load_checkpoint(tmp_path / "m.gguf")


def test_missing_tensor_named(tmp_path, model_path):
    hf = tiny_hf_folder(tmp_path)
    del hf
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelFileError, match="missing tensor 'layers.1.up'"):
        load_checkpoint(tmp_path)


def test_embedded_model_config(checkpoint):
    c = checkpoint.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        30, 576, 1536, 9, 3, 64)
    assert (c.vocab_size, c.rope_theta, c.tie_embeddings, c.rope_scaling) == (49152, 100000.0, True, None)
    assert checkpoint.eos_ids == (2,)


def test_qwen2_with_a_peft_adapter_matches_peft(tmp_path):
    """A PEFT LoRA (every projection) on a Qwen2 file: our batched LoRA path against PEFT's forward."""
    from peft import LoraConfig, get_peft_model

    from sidecar.model.lora import LoraBatch, LoraSlots, load_peft_adapter

    hf = tiny_gguf(tmp_path / "m.gguf", "F32", arch="qwen2")
    torch.manual_seed(0)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False,
                                                lora_dropout=0.0)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ckpt = load_checkpoint(tmp_path / "m.gguf")
    slots = LoraSlots(ckpt.config, num_slots=2, dtype=torch.float32)
    slots.load(1, load_peft_adapter(tmp_path / "adapter", ckpt.config))
    model = LlamaModel.from_checkpoint(ckpt, "fp32")
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, VOCAB, size=(1, 40)))
    ours = model.forward(ids, start=[0], rows=[0], cache=model.new_cache(1, 40), all_logits=True,
                         lora=LoraBatch(slots, [1], 40))[0]
    with torch.no_grad():
        ref = peft_model(ids).logits[0]
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits[0]
    assert (ref - plain).abs().max() > 10 * (ours - ref).abs().max()  # the adapter matters, and matches
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_qwen2_decode_steps_and_greedy_match_transformers(tmp_path):
    """Token by token through the K/V cache (biases on every cached key) against transformers' logits of
    the whole sequence; then a greedy continuation (top-2 margins here are > 0.5: no near-ties)."""
    hf = tiny_gguf(tmp_path / "m.gguf", "Q4_K", arch="qwen2")
    model = LlamaModel.from_checkpoint(load_checkpoint(tmp_path / "m.gguf"), "fp32")
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, VOCAB, size=(1, 36)))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    cache = model.new_cache(1, 36)
    model.forward(ids[:, :12], start=[0], rows=[0], cache=cache)
    steps = torch.stack([model.forward(ids[:, p:p + 1], start=[p], rows=[0], cache=cache)[0] for p in range(12, 36)])
    assert ((steps - ref[12:]).abs().max() / ref.abs().max()).item() < 1e-5
    with torch.no_grad():
        greedy = hf.generate(ids[:, :12], max_new_tokens=16, do_sample=False, eos_token_id=None)[0, 12:].tolist()
    cache, ours = model.new_cache(1, 28), []
    logits = model.forward(ids[:, :12], start=[0], rows=[0], cache=cache)
    for step in range(16):
        ours.append(int(logits.argmax(-1)))
        logits = model.forward(torch.tensor([[ours[-1]]]), start=[12 + step], rows=[0], cache=cache)
    assert ours == greedy


def test_auto_keeps_each_kind_at_its_precision(tmp_path):
    """A Q4_K_M-style file: Q4_K matrices become int4 repacked (the file's values to the last bit but the
    ~0.1% of groups whose zero point rounds, tests/test_quant.py), Q6_K ones int8, and a fused q/k/v with
    a Q6_K v takes int8 whole: nothing is stored in fewer bits than the file gives it."""
    from sidecar.engine.base_model import describe_formats

    hf = tiny_gguf(tmp_path / "m.gguf", "Q4_K", matrix_kinds={"v": "Q6_K", "down": "Q6_K"})
    model = LlamaModel.from_checkpoint(load_checkpoint(tmp_path / "m.gguf"), "auto", torch.float32)
    layer, ref = model.layers[0], hf.model.layers[0]
    assert (layer.qkv.format, layer.o.format, layer.gate_up.format, layer.down.format) == ("int8", "int4", "int4",
                                                                                            "int8")
    assert model.weights == "int4+int8"
    assert describe_formats(model) == ("Q4_K -> int4 x6, Q4_K -> int8 x4, Q4_K (output head) -> int8 x1, "
                                       "Q6_K -> int8 x4")  # the head stays at 8 bits, as llama.cpp keeps it
    o = ref.self_attn.o_proj.weight.detach()
    assert ((layer.o.dequantized() - o).abs() > 1e-6 * o.abs().max()).float().mean() < 0.01
    down = ref.mlp.down_proj.weight.detach()
    assert ((layer.down.dequantized() - down).norm() / down.norm()).item() < 0.01  # int8 per channel


@pytest.mark.parametrize("kind,became", [("Q2_K", "int4"), ("Q3_K", "int4"), ("Q5_0", "int8"), ("Q5_1", "int8"),
                                         ("Q5_K", "int8")])
def test_auto_rounds_each_kind_within_its_new_grid(tmp_path, kind, became):
    """`--weights auto` on the kinds it re-rounds: 2- and 3-bit K-quants onto int4 (16 levels between each
    group of 32's min and max), 5-bit kinds onto int8 per channel (a step of max|w| / 127); every weight is
    within half a step of the file's value (gguf-py's dequantization, which transformers gets too)."""
    hf = tiny_gguf(tmp_path / "m.gguf", kind)
    model = LlamaModel.from_checkpoint(load_checkpoint(tmp_path / "m.gguf"), "auto", torch.float32)
    mlp = hf.model.layers[1].mlp
    ref = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
    layer = model.layers[1].gate_up
    assert layer.format == became
    if became == "int4":
        groups = ref.reshape(ref.shape[0], -1, 32)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, dim=1)
    else:
        step = (ref.abs().amax(dim=1, keepdim=True) / 127).expand_as(ref)
    error = (layer.dequantized() - ref).abs()
    assert (error <= step / 2 * (1 + 1e-3) + 1e-7).all(), (error / step).max()
    assert (error > 1e-6 * ref.abs().max()).any()  # re-rounded indeed (not a kind kept as it is)


def test_a_q4_k_m_file_matches_transformers_reading_it(tmp_path):
    """The bench's random Q4_K_M file (llama.cpp's mix of Q4_K and Q6_K, Llama-3 tokenizer metadata) read by
    transformers' own GGUF loader: the same logits at fp32, and the per-layer kinds llama.cpp would choose."""
    from transformers import AutoModelForCausalLM

    from sidecar.bench.random_gguf import write_random_gguf
    from sidecar.bench.random_model import ModelShape, _llama3

    shape = ModelShape("k-tiny", _llama3(1024, 256, 512, 8, 4, 2, 64), num_special=16)
    path = write_random_gguf(tmp_path / "m.gguf", shape, progress=False)
    ckpt = load_checkpoint(path)
    v_kinds = [ckpt.tensor(f"layers.{i}.v").kind for i in range(8)]
    assert v_kinds == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 1024, size=(1, 24)))
    model = LlamaModel.from_checkpoint(ckpt, "fp32")
    ours = model.forward(ids, start=[0], rows=[0], cache=model.new_cache(1, 24), all_logits=True)[0]
    with torch.no_grad():
        ref = hf(ids).logits[0]
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.skipif(quant_gemm_kernel() is None, reason="no C compiler or no AVX2 on this CPU")
def test_served_q4_k_m_keeps_the_blocks_as_stored(tmp_path):
    """Served (bf16 activations, `auto`): every Q4_K and Q6_K matrix, the tied head included, is multiplied from
    its blocks as stored (a fused q/k/v with a Q6_K v in two parts); the weights are gguf-py's to the last bit,
    the logits within bf16-and-int8-activation rounding of transformers' reading of the file."""
    from transformers import AutoModelForCausalLM

    from sidecar.bench.random_gguf import write_random_gguf
    from sidecar.bench.random_model import ModelShape, _llama3
    from sidecar.engine.base_model import describe_formats
    from sidecar.model.quant import BlockLinear, StackedLinear

    shape = ModelShape("k-tiny", _llama3(1024, 256, 512, 8, 4, 2, 64), num_special=16)
    path = write_random_gguf(tmp_path / "m.gguf", shape, progress=False)
    ckpt = load_checkpoint(path)
    model = LlamaModel.from_checkpoint(ckpt, "auto")
    assert describe_formats(model) == "Q4_K -> q4_k x48, Q6_K -> q6_k x8, Q6_K (output head) -> q6_k x1"
    qkv = model.layers[0].qkv  # layer 0's v is Q6_K
    assert isinstance(qkv, StackedLinear) and qkv.format == "q4_k+q6_k"
    assert isinstance(model.head, BlockLinear)
    ref_v = torch.cat([ckpt.tensor(f"layers.0.{n}").to_float() for n in ("q", "k", "v")])
    assert torch.equal(qkv.dequantized(), ref_v)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 1024, size=(1, 24)))
    ours = model.forward(ids, start=[0], rows=[0], cache=model.new_cache(1, 24), all_logits=True)[0]
    with torch.no_grad():
        ref = hf(ids).logits[0]
    # Random weights leave a few positions ill-conditioned (their residual stream nearly cancels: rms 326
    # against ~10,000 elsewhere), where any rounding, bf16's included, moves the logits: the median position
    # is what the kernels' precision shows.
    per_position = (ours - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert per_position.median().item() < 0.02
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_prompt_weights_choice(tmp_path):
    """--prompt-weights: bf16 copies of the int4 / int8 layers where asked (auto: CPUs with native bf16 matmuls,
    copies up to the limit); a float model has nothing to copy; a bad choice names the flag."""
    from sidecar.config import PROMPT_COPY_LIMIT_MB, ModelConfig
    from sidecar.engine.base_model import load_base_model, wants_prompt_copies
    from sidecar.errors import UserError
    from sidecar.model.quant import PromptDenseLinear

    with pytest.raises(UserError, match="--prompt-weights"):
        ModelConfig(tmp_path / "x.gguf", prompt_weights="fp8")
    assert wants_prompt_copies("bf16", 10 * PROMPT_COPY_LIMIT_MB) and not wants_prompt_copies("same", 1)
    assert not wants_prompt_copies("auto", PROMPT_COPY_LIMIT_MB + 1)
    assert wants_prompt_copies("auto", 1) == (torch.cpu._is_avx512_bf16_supported()
                                             or torch.cpu._is_amx_tile_supported())
    path = tmp_path / "q4.gguf"
    tiny_gguf(path, "Q4_0")
    held = {choice: load_base_model(ModelConfig(path, "int4", prompt_weights=choice)).model
            for choice in ("bf16", "same")}
    assert all(isinstance(m, PromptDenseLinear) for m in held["bf16"].layer_matrices())
    assert not any(isinstance(m, PromptDenseLinear) for m in held["same"].layer_matrices())
    assert held["bf16"].prompt_copy_bytes() == 0 < held["same"].prompt_copy_bytes()  # what is held no longer counts
    fp32 = load_base_model(ModelConfig(path, "fp32", prompt_weights="bf16")).model
    assert fp32.prompt_copy_bytes() == 0 and not any(isinstance(m, PromptDenseLinear) for m in fp32.layer_matrices())
