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


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
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
