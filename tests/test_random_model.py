"""The random-weight model folders the GPU benchmark runs on, and the benchmark's GPU report, checked on the CPU.

A folder is only a fair benchmark model if it is a valid Llama for both sides: our loader and
transformers must read it and compute the same logits, and its tokenizer must decode every id a
random model can generate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from sidecar.bench.agreement import gap_summary
from sidecar.bench.multi_npc import MultiNpcConfig, gpu_markdown, prepare, worker
from sidecar.bench.random_model import SHAPES, _write_tokenizer, ensure_random_model, write_random_model
from sidecar.bench.workload import persona, player_line
from sidecar.cli import main as cli_main
from sidecar.engine.tokenizer import ChatMessage, Tokenizer
from sidecar.model.checkpoint import load_checkpoint
from sidecar.model.hf_folder import read_hf_metadata
from sidecar.model.llama import LlamaModel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return ensure_random_model(tmp_path_factory.mktemp("models"), "tiny", progress=False)


def _chat(i: int) -> list[ChatMessage]:
    return [ChatMessage("system", persona(i)), ChatMessage("user", player_line(i))]


def test_tiny_folder_is_the_same_llama_for_us_and_transformers(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = load_checkpoint(tiny)
    assert ckpt.config.vocab_size == SHAPES["tiny"].config.vocab_size and ckpt.config.rope_scaling.kind == "llama3"
    tok = Tokenizer(ckpt)
    ids = tok.encode_chat(_chat(0))
    hf_tok = AutoTokenizer.from_pretrained(tiny)
    assert ids == hf_tok.apply_chat_template([m.__dict__ for m in _chat(0)], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    ids = ids[:48]

    ours_model = LlamaModel.from_checkpoint(ckpt, "fp32")
    cache = ours_model.new_cache(rows=1, max_len=len(ids))
    ours = ours_model.forward(torch.tensor([ids]), start=[0], rows=[0], cache=cache, all_logits=True)[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape == (len(ids), SHAPES["tiny"].config.vocab_size)
    assert ref.std() > 0.1, "random logits should not be flat"
    # Same bf16-exact weights upcast to fp32 on both sides: only summation order differs.
    assert (ours - ref).abs().max().item() < 1e-4


def test_random_weights_are_seeded_and_sane(tiny, tmp_path):
    again = write_random_model(tmp_path / "again", "tiny", seed=0, progress=False)
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(tiny)
    other = write_random_model(tmp_path / "other", "tiny", seed=1, progress=False)
    assert digest(other) != digest(tiny)
    tensors = load_checkpoint(tiny).tensors
    assert tensors["layers.0.q"].kind == "BF16"
    assert abs(tensors["layers.1.down"].to_float().std().item() - 0.02) < 0.002
    assert torch.equal(tensors["norm"].to_float(), torch.ones(SHAPES["tiny"].config.hidden_size))


@pytest.mark.parametrize("shape", ["tiny", "llama-3.2-1b"])
def test_every_token_id_decodes(shape, tmp_path):
    """A random model generates arbitrary ids: each must stand for bytes our detokenizer can stream."""
    s = SHAPES[shape]
    (tmp_path / "config.json").write_text(json.dumps(s.config_json()))
    _write_tokenizer(tmp_path, s)
    tok = Tokenizer(read_hf_metadata(tmp_path))  # no weights needed for the tokenizer
    assert tok.vocab_size == s.config.vocab_size
    assert tok.eos_ids == (s.config.vocab_size - s.num_special + 1, s.config.vocab_size - s.num_special + 8,
                           s.config.vocab_size - s.num_special + 9)
    assert tok.bos_id == s.config.vocab_size - s.num_special
    detok = tok.detokenizer()
    text = "".join(detok.push(i) for i in range(s.config.vocab_size)) + detok.flush()
    assert len(text) > s.config.vocab_size - s.num_special  # every non-special id stands for at least one byte
    if shape == "llama-3.2-1b":  # about as many tokens as Llama 3's own tokenizer gives the persona (~180)
        assert 150 < len(tok.encode_chat(_chat(3))) < 220


def test_multi_npc_worker_runs_on_the_tiny_shape(tiny, tmp_path):
    cfg = MultiNpcConfig(model=tiny, ns=(2,), tokens=4, peers=("hf-peft",), workdir=tmp_path)
    adapters = prepare(cfg, tiny)
    ours = worker("npc-sidecar", tiny, adapters, n=2, tokens=4)
    peer = worker("hf-peft", tiny, adapters, n=2, tokens=4, score={"npc-sidecar": ours["token_ids"]})
    for system, r in (("npc-sidecar", ours), ("hf-peft", peer)):
        assert r["system"] == system and r["n"] == 2 and r["tokens"] == 8
        assert r["tok_s"] > 0 and r["ttft_p50_ms"] > 0 and "gpu_mem_mb" not in r
        assert [len(ids) for ids in r["token_ids"]] == [4, 4]
    # The peer scored the sidecar's greedy tokens under its own model, NPC by NPC (agreement.py).
    assert [(s["steps"], s["max_gap"] is not None) for s in peer["scores"]["npc-sidecar"]] == [(4, True)] * 2


def _fake_gpu_data() -> dict:
    shape = SHAPES["llama-3.2-1b"]
    results = []
    for n in (8, 32, 128):
        for system, tok_s in (("npc-sidecar", 100.0 * n), ("hf-peft", 20.0 * n), ("npc-sidecar-no-lora", 120.0 * n)):
            if (system, n) == ("hf-peft", 128):
                continue
            results.append({"system": system, "n": n, "tok_s": tok_s, "ttft_p50_ms": 50.0, "ttft_p95_ms": 80.0,
                            "itl_p50_ms": 9.5, "itl_p99_ms": 12.25, "tokens": 32 * n, "rss_mb": 3000.0,
                            "gpu_mem_mb": 4000.0 + n, "token_ids": [[7] * 32] * n})
            if system == "hf-peft":  # it scored the sidecar's tokens: all its own choices (agreement.py)
                results[-1]["scores"] = {"npc-sidecar": [gap_summary([0.0] * 32)] * n}

    return {"scenario": "multi-npc", "model": "/tmp/npc-bench-multi/models/llama-3.2-1b", "tokens": 32, "rank": 16,
            "machine": {"cpu": "Some CPU", "cores": 16, "torch_threads": 16, "torch": "2.11.0+cu130",
                        "python": "3.12.3", "date": "2026-12-01 12:00 UTC"},
            "skipped_peers": [], "results": results, "device": "cuda", "weights": "bf16",
            "model_shape": "llama-3.2-1b", "random_weights": True,
            "libraries": {"transformers": "5.17.0", "peft": "0.18.0"}, "prompt_tokens_mean": 183.5,
            "run_timeout_s": 240.0, "time_budget_s": 300.0,
            "failed": [{"system": "hf-peft", "n": 128, "error": "timed out after 240 s"}],
            "shape": shape.summary(),
            "gpu": {"name": "NVIDIA H200", "memory_gib": 139.8, "sms": 132, "torch": "2.11.0+cu130", "cuda": "13.0",
                    "driver": "580.159.04"}}


def test_gpu_report_from_fake_results(tmp_path):
    from sidecar.bench.multi_npc import _write

    data = _fake_gpu_data()
    md = gpu_markdown(data)
    assert "NVIDIA H200" in md and "torch 2.11.0+cu130 (CUDA 13.0)" in md and "driver 580.159.04" in md
    assert "**random weights**" in md and "`llama-3.2-1b` (1.24B parameters" in md and "vocab 128256" in md
    assert "hf-peft N=128 (timed out after 240 s)" in md and "UNVERIFIED" not in md
    assert "| hf-peft | 8 | 32/32 NPCs within 1" not in md and "| hf-peft | 8 | 8/8 NPCs within 1;" in md
    rows = [line for line in md.splitlines()
            if line.startswith(("| npc-sidecar", "| hf-peft")) and "NPCs within" not in line]  # the speed table
    assert len(rows) == 8
    assert rows[0] == "| npc-sidecar | 8 | 800 | 50 | 80 | 9.5 | 12.2 | 4008 | 3000 | - |"
    assert "| hf-peft | 8 | 160 | 50 | 80 | 9.5 | 12.2 | 4008 | 3000 | 5.00x |" in rows

    cfg = MultiNpcConfig(model_shape="llama-3.2-1b", device="cuda", out_dir=tmp_path)
    assert cfg.report_name == "gpu" and cfg.resolved_weights == "bf16"
    _write(cfg, data)
    assert json.loads((tmp_path / "gpu.json").read_text()) == data
    assert (tmp_path / "gpu.md").read_text() == md + "\n"
    assert (tmp_path / "gpu.png").stat().st_size > 10_000
    assert not (tmp_path / "multi_npc.md").exists()


def test_bench_flags_are_checked(capsys):
    assert cli_main(["bench", "--scenario", "multi-npc", "--model", "x.gguf", "--model-shape", "tiny"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert cli_main(["bench", "--scenario", "multi-npc", "--model-shape", "llama-9"]) == 2
    assert "unknown shape" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["bench", "--scenario", "multi-npc", "--model-shape", "tiny", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
