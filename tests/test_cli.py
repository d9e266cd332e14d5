"""`npc generate` as a user runs it: a real process, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sidecar.config import FACT_CONTRAST
from sidecar.model.native import quant_gemm_kernel
from tests.sidecar_process import REPO
from tests.tiny import tiny_gguf


def npc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_generate_raw_fp32_json_matches_transformers(hf_model, tokenizer):
    """The foundation's acceptance check: token for token against transformers."""
    run = npc("generate", "--raw", "--weights", "fp32", "--json", "Once upon a time")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["prompt_token_ids"] == [6403, 1980, 253, 655]
    assert out["weights"] == "fp32"
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([out["prompt_token_ids"]]), max_new_tokens=128, do_sample=False)
    ref = ref[0, 4:].tolist()
    if out["finish_reason"] == "stop":
        assert ref[len(out["token_ids"])] in tokenizer.eos_ids
    else:
        assert out["finish_reason"] == "length" and len(out["token_ids"]) == 128
    assert out["token_ids"] == ref[: len(out["token_ids"])]
    assert out["text"] == tokenizer.decode(out["token_ids"])


def test_generate_chat_streams_text_and_stops_at_eos():
    run = npc("generate", "--max-tokens", "64", "--system", "Answer in one short sentence.",
              "What is the capital of France?")
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    assert "[stop;" in run.stderr and "weights int4" in run.stderr  # auto picks int4 for a Q4_1 file


def test_seeded_sampling_is_reproducible():
    args = ("generate", "--json", "--temperature", "0.9", "--seed", "7", "--max-tokens", "24", "Tell me a story.")
    first, second = npc(*args), npc(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["token_ids"] == json.loads(second.stdout)["token_ids"]


def _assert_user_error(run: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> None:
    """One line naming what is wrong, no traceback; exit code 2 for a flag or usage mistake, 1 for a model file."""
    assert run.returncode == code, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, model_path: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    data = model_path.read_bytes()
    files = {"truncated": d / "truncated.gguf", "short": d / "short.gguf", "text": d / "notes.gguf"}
    files["truncated"].write_bytes(data[: len(data) - 4096])
    files["short"].write_bytes(data[:2_000_000])
    files["text"].write_text("this is not a model\n")
    files["falcon"] = d / "falcon.gguf"
    tiny_gguf(files["falcon"], "F32", arch="falcon")
    files["iq4"] = d / "iq4.gguf"
    tiny_gguf(files["iq4"], "F32", embed_kind="IQ4_NL")
    files["contradicts"] = d / "contradicts.gguf"
    tiny_gguf(files["contradicts"], "F32", stated_ffn_length=384)
    files["no_template"] = d / "base.gguf"
    tiny_gguf(files["no_template"], "Q8_0")
    return files


@pytest.mark.parametrize("name,fragments", [
    ("truncated", ["truncated.gguf", "truncated or corrupt"]),
    ("short", ["short.gguf", "truncated or corrupt"]),
    ("text", ["notes.gguf", "not a GGUF file"]),
    ("falcon", ["falcon.gguf", "unsupported architecture 'falcon'"]),
    ("iq4", ["iq4.gguf", "token_embd.weight", "unsupported type IQ4_NL"]),
    ("contradicts", ["contradicts.gguf", "blk.0.ffn_gate.weight", "shape [512, 256], expected [384, 256]"]),
])
def test_bad_model_files(bad_files, name, fragments):
    _assert_user_error(npc("generate", "--model", str(bad_files[name]), "hi"), *fragments, code=1)


def test_serving_a_model_without_a_chat_template_is_refused_at_start(bad_files, tmp_path):
    run = npc("serve", "--model", str(bad_files["no_template"]), "--listen", "127.0.0.1:0", "--characters",
              str(tmp_path))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]  # after the loading log lines
    assert "base.gguf" in last and "no chat template" in last, run.stderr


def test_missing_model_file_via_environment(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    _assert_user_error(npc("generate", "hi", env={"NPC_MODEL": str(missing)}), str(missing), "no such file", code=1)


def test_unknown_weight_format():
    _assert_user_error(npc("generate", "--weights", "int3", "hi"), "--weights", "int3")




def test_stdout_holds_only_the_commands_output(tmp_path):
    """Library log lines (the lore loader's "lore file loaded") go to stderr: `npc eval --json | jq` and
    scripts reading a command's stdout must see only its output. The retrieval bench loads the sample lore."""
    run = npc("bench", "--scenario", "retrieval", "--entries", "200", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(tmp_path / f"retrieval.{ext}") for ext in ("json", "md", "png")]
    assert "lore file loaded" not in run.stderr  # below the commands' warning level
    data = json.loads((tmp_path / "retrieval.json").read_text())
    assert data["entries"] == 200 and data["p95_ms"] > 0 and set(data["recall"]) == {
        "blacksmith", "elara", "oracle", "quartermaster"}


def test_scenes_bench_writes_its_report(tmp_path):
    """`npc bench --scenario scenes`, tiny: one scene of three sample characters, together and alone."""
    characters = tmp_path / "characters"
    for cid in ("blacksmith", "elara", "oracle"):
        shutil.copytree(REPO / "characters" / cid, characters / cid)
    run = npc("bench", "--scenario", "scenes", "--n", "1", "--lines", "3", "--tokens", "4",
              "--characters", str(characters), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    data = json.loads((tmp_path / "out" / "scenes.json").read_text())
    (result,) = data["runs"]
    assert result["k"] == 1 and data["server_errors"] == 0
    for how in ("together", "one_after_another"):
        assert result[how]["lines"] == 3 and result[how]["lines_per_s"] > 0 and result[how]["handoff_p50_ms"] > 0
    # A player talked beside the scenes, and alone: three first-token times each.
    assert len(result["together"]["player_first_token_ms"]) == 3 and len(data["player_first_token_ms_idle"]) == 3
    assert min(result["together"]["player_first_token_ms"] + data["player_first_token_ms_idle"]) > 0
    assert (tmp_path / "out" / "scenes.png").stat().st_size > 0
    bad = npc("bench", "--scenario", "scenes", "--lines", "0", "--characters", str(characters))
    _assert_user_error(bad, "--lines")


def test_warm_ttft_bench_sees_the_prefix_cache_serve_the_next_line(tmp_path):
    """`npc bench --scenario warm-ttft`, tiny: the session's second line reuses the first's persona and
    history from the prefix cache although the facts block changes between them."""
    characters = tmp_path / "characters"
    shutil.copytree(REPO / "characters" / "blacksmith", characters / "blacksmith")
    run = npc("bench", "--scenario", "warm-ttft", "--turns", "2", "--tokens", "4", "--characters", str(characters),
              "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    data = json.loads((tmp_path / "out" / "warm_ttft.json").read_text())
    assert set(data["turns"]) == {str(w) for w in {0.0, FACT_CONTRAST}}  # with and without the shadow rows
    for contrast, turns in data["turns"].items():
        first, second = turns["blacksmith"]
        assert first["facts"] > 0 and second["facts"] > 0
        # Cold, nothing is cached; with a shadow (its prompt less the facts) prefilled first, the persona is.
        assert first["cached_tokens"] == 0 if float(contrast) == 0 else first["cached_tokens"] >= 32
        # The persona block and the first exchange are served from the cache: all but the facts and the new line.
        assert second["cached_tokens"] > first["prompt_tokens"] // 2, (first, second)


def test_check_model_names_what_each_kind_becomes(tmp_path):
    tiny_gguf(tmp_path / "qwen.gguf", "Q4_K", arch="qwen2", matrix_kinds={"down": "Q6_K"},
              chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    run = npc("check-model", str(tmp_path / "qwen.gguf"))
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "architecture  qwen2" in out and "chat template: yes" in out
    assert "Q4_K x13" in out and "Q6_K x2" in out and "F32 x" in out  # 6 Q4_K matrices a layer, and the embedding
    if quant_gemm_kernel() is not None:  # served from the blocks as stored (native/quant_gemm.c)
        assert "Q6_K -> q6_k x2" in out and "Q4_K -> q4_k x12" in out
    else:
        assert "Q6_K -> int8 x2" in out and "Q4_K -> int4 x12" in out
    # Prompt chunks: bf16 copies on CPUs with bf16 matmuls (--prompt-weights auto), counted in the weights' memory.
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert ("prompt chunks: bf16 copies" in out) == native and ("prompt chunks: the same weights" in out) != native
    rates = json.loads(npc("check-model", str(tmp_path / "qwen.gguf"), "--json").stdout)["decode_tokens_per_s"]
    assert set(rates) == {"1", "8"} and all(r > 0 for r in rates.values())


def test_fact_boost_out_of_range_is_named():
    _assert_user_error(npc("serve", "--fact-boost", "11", "--listen", "127.0.0.1:0"), "--fact-boost", "11")


def test_fact_contrast_out_of_range_or_where_it_cannot_work_is_named():
    _assert_user_error(npc("serve", "--fact-contrast", "5", "--listen", "127.0.0.1:0"), "--fact-contrast", "5")
    _assert_user_error(npc("serve", "--fact-contrast", "0.5", "--backend", "remote", "--remote-url", "http://x:1",
                           "--listen", "127.0.0.1:0"), "--fact-contrast", "--backend remote")
    _assert_user_error(npc("serve", "--fact-contrast", "0.5", "--max-batch", "1", "--listen", "127.0.0.1:0"),
                       "--fact-contrast", "--max-batch 1")
