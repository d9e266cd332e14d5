"""The llama.cpp peer: our PEFT -> GGUF LoRA converter checked against PEFT itself, and the serial runner."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")

from sidecar.bench.peer_llama_cpp import LlamaCppPeer, convert_peft_to_gguf_lora, generate_llama_cpp  # noqa: E402
from sidecar.engine.tokenizer import ChatMessage  # noqa: E402
from sidecar.model.checkpoint import unpermute_rows  # noqa: E402
from sidecar.model.random_adapter import write_random_adapter  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj")
MESSAGES = [ChatMessage("system", "You are a gruff dwarven blacksmith."), ChatMessage("user", "Can you fix my axe?")]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, checkpoint) -> tuple[Path, Path]:
    """(PEFT folder, converted GGUF) for a rank-8 adapter large enough (std 0.05) to move the logits a lot."""
    root = tmp_path_factory.mktemp("llama_cpp_lora")
    folder = write_random_adapter(root / "peft", checkpoint.config, seed=1, rank=8, targets=TARGETS, std=0.05)
    return folder, convert_peft_to_gguf_lora(folder, checkpoint.config, root / "adapter.gguf")


def test_gguf_adapter_holds_the_peft_delta(tmp_path, checkpoint):
    # Read the file back and rebuild scale * B @ A per matrix: after undoing llama.cpp's q/k row order with
    # the loader's own unpermute_rows it must equal PEFT's delta, including rsLoRA and a per-module alpha.
    import gguf
    from safetensors.torch import load_file

    config = checkpoint.config
    folder = write_random_adapter(tmp_path / "peft", config, seed=3, rank=4, alpha=16.0, targets=TARGETS)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(use_rslora=True, alpha_pattern={"v_proj": 4.0})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    reader = gguf.GGUFReader(convert_peft_to_gguf_lora(folder, config, tmp_path / "a.gguf"))

    def field(key: str):
        f = reader.fields[key]
        return f.contents()

    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == "llama"
    alpha = field("adapter.lora.alpha")
    assert alpha == pytest.approx(16.0 * math.sqrt(4))  # llama.cpp's alpha / r == PEFT's alpha / sqrt(r)
    stored = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    assert len(stored) == 2 * len(TARGETS) * config.num_layers
    peft = load_file(folder / "adapter_model.safetensors")
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "up_proj": "ffn_up"}
    rows = {"q_proj": unpermute_rows(config.num_heads, config.head_dim),
            "k_proj": unpermute_rows(config.num_kv_heads, config.head_dim)}
    for layer in (0, config.num_layers - 1):
        for module, short in names.items():
            a, b = stored[f"blk.{layer}.{short}.weight.lora_a"], stored[f"blk.{layer}.{short}.weight.lora_b"]
            assert a.shape == (4, config.hidden_size)  # numpy [rank, in] == ggml ne [in, rank]
            ours = (alpha / 4) * (b @ a)
            if module in rows:
                ours = ours[rows[module]]
            prefix = f"base_model.model.model.layers.{layer}.{'mlp' if module == 'up_proj' else 'self_attn'}.{module}"
            module_alpha = 4.0 if module == "v_proj" else 16.0
            ref = module_alpha / math.sqrt(4) * (peft[f"{prefix}.lora_B.weight"] @ peft[f"{prefix}.lora_A.weight"])
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def logits(adapter, model_path, tokenizer) -> dict[str, np.ndarray]:
    """Prompt logits [T, V] from llama.cpp and from transformers + PEFT, each without and with the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, gguf_path = adapter
    ids = tokenizer.encode_chat(MESSAGES)
    with LlamaCppPeer(model_path, [gguf_path], n_ctx=256, threads=1, logits_all=True) as peer:
        out = {"cpp_base": peer.prompt_logits(ids, None), "cpp_lora": peer.prompt_logits(ids, 0)}
    # A private copy: PEFT injects its layers into the model it wraps.
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=torch.float32)
    with torch.no_grad():
        out["hf_base"] = model.eval()(torch.tensor([ids])).logits[0].numpy()
        out["hf_lora"] = PeftModel.from_pretrained(model, folder).eval()(torch.tensor([ids])).logits[0].numpy()
    return out


def test_llama_cpp_reproduces_the_peft_adapter(logits):
    # llama.cpp multiplies Q4_1 weights with Q8-quantized activations, transformers with the exactly
    # dequantized fp32 weights, so even the bare models differ (max |logit diff| 1.5, argmax agreement
    # 0.88-0.97). Compare what the adapter changes instead. Measured over 3 seeds x 2 prompts: corr
    # 0.993-0.998, least-squares slope 0.975-1.025, relative error of the change 0.06-0.12; every argmax
    # llama.cpp picks is within 0.2 logits of PEFT's best (0.13 for the bare models). Leaving out the q/k
    # row permutation drops the correlation to 0.21.
    d_cpp = logits["cpp_lora"] - logits["cpp_base"]
    d_hf = logits["hf_lora"] - logits["hf_base"]
    assert np.abs(d_hf).max() > 5  # the adapter moves logits by far more than the quantization noise
    assert (logits["hf_lora"].argmax(-1) != logits["hf_base"].argmax(-1)).mean() > 0.2

    assert np.corrcoef(d_cpp.ravel(), d_hf.ravel())[0, 1] > 0.98
    assert float((d_cpp * d_hf).sum() / (d_hf * d_hf).sum()) == pytest.approx(1.0, abs=0.1)  # alpha / r right
    assert np.linalg.norm(d_cpp - d_hf) / np.linalg.norm(d_hf) < 0.25

    picked = logits["cpp_lora"].argmax(-1)
    hf = logits["hf_lora"]
    gap = hf.max(-1) - hf[np.arange(len(picked)), picked]  # 0 where the argmax agrees
    assert (gap == 0).mean() > 0.7
    assert gap.max() < 0.5
    assert (gap[-4:] == 0).all()  # the last positions, where the reply starts, agree exactly


def test_run_serves_each_npc_with_its_own_adapter(adapter, model_path, tokenizer, logits):
    _, gguf_path = adapter
    prompts = [tokenizer.encode_chat(MESSAGES), tokenizer.encode_raw_prompt("Once upon a time")]
    garbage = [[7] * 6, list(range(100, 106))]
    timings, tokens, gaps = generate_llama_cpp(model_path, [gguf_path, gguf_path], prompts, max_new_tokens=6,
                                               threads=1, score={"garbage": garbage})
    assert len(timings) == len(tokens) == 2
    assert timings[0].submitted == timings[1].submitted  # every NPC asked at once
    for timing, ids in zip(timings, tokens, strict=True):
        assert len(timing.token_times) == len(ids) == 6
        assert timing.submitted <= timing.token_times[0]
        assert timing.token_times == sorted(timing.token_times)
    assert timings[1].token_times[0] >= timings[0].token_times[-1]  # one request after another
    # The first greedy token is the argmax of the adapted prompt logits computed separately above.
    assert tokens[0][0] == int(logits["cpp_lora"][-1].argmax())
    # Scoring another system's tokens: each step's gap below llama.cpp's own best logit.
    assert [len(g) for g in gaps["garbage"]] == [6, 6] and min(min(g) for g in gaps["garbage"]) > 1
    with LlamaCppPeer(model_path, [gguf_path], n_ctx=256, threads=1) as peer:
        assert peer.score(prompts[0], tokens[0], 0) == [0.0] * 6  # its own greedy choices
