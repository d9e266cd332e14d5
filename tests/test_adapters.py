"""PEFT adapter folders: what loads, and the clear error each broken folder gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sidecar.model.lora import AdapterError, load_peft_adapter
from sidecar.model.random_adapter import write_random_adapter


@pytest.fixture
def adapter(tmp_path, checkpoint) -> Path:
    return write_random_adapter(tmp_path / "npc", checkpoint.config, seed=0, rank=8,
                                targets=("q_proj", "v_proj", "down_proj"))


def _edit_weights(folder: Path, change) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")


def _edit_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def test_loads_and_folds_scale(adapter, checkpoint):
    loaded = load_peft_adapter(adapter, checkpoint.config)
    assert loaded.rank == 8 and loaded.target_modules == {"q_proj", "v_proj", "down_proj"}
    raw = load_file(adapter / "adapter_model.safetensors")
    b = raw["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"]
    assert torch.allclose(loaded.weights[(3, "v_proj")][1], b * 32 / 8)  # lora_alpha / r
    _edit_config(adapter, use_rslora=True)
    rs = load_peft_adapter(adapter, checkpoint.config)
    assert torch.allclose(rs.weights[(3, "v_proj")][1], b * 32 / 8**0.5)  # lora_alpha / sqrt(r)
    assert rs.fingerprint != loaded.fingerprint  # a changed file is a different adapter
    half = load_peft_adapter(adapter, checkpoint.config, scale=0.5)  # a character's lora_scale
    assert torch.allclose(half.weights[(3, "v_proj")][1], b * 0.5 * 32 / 8**0.5)
    assert half.fingerprint != rs.fingerprint  # its K/V differ: never shared in the prefix cache


def _break(name: str, folder: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    if name == "missing-config":
        (folder / "adapter_config.json").unlink()
    elif name == "missing-weights":
        (folder / "adapter_model.safetensors").unlink()
    elif name == "pickle":
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04\x95pickle")
    elif name == "bad-json":
        (folder / "adapter_config.json").write_text("{r: 8")
    elif name == "rank-too-high":
        _edit_weights(folder, lambda t: t.update({k: torch.zeros(128, *v.shape[1:]) if "lora_A" in k else
                                                  torch.zeros(v.shape[0], 128) for k, v in t.items()}))
    elif name == "unknown-module":
        _edit_weights(folder, lambda t: t.update({
            "base_model.model.model.layers.0.self_attn.rotary_proj.lora_A.weight": torch.zeros(8, 576)}))
    elif name == "embedding":
        _edit_weights(folder, lambda t: t.update({
            "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 49152)}))
    elif name == "wrong-shape":
        _edit_weights(folder, lambda t: t.update({key: torch.zeros(8, 500)}))
    elif name == "nan":
        _edit_weights(folder, lambda t: t[key].__setitem__((0, 0), float("nan")))
    elif name == "layer-out-of-range":
        _edit_weights(folder, lambda t: t.update({
            k.replace("layers.0.", "layers.99."): v.clone() for k, v in list(t.items()) if "layers.0." in k}))
    elif name == "truncated":
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif name == "dora":
        _edit_config(folder, use_dora=True)


@pytest.mark.parametrize("name,message", [
    ("missing-config", "missing adapter_config.json"),
    ("missing-weights", "missing adapter_model.safetensors"),
    ("pickle", "pickled weights"),
    ("bad-json", "not valid JSON"),
    ("rank-too-high", "above max_rank 64"),
    ("unknown-module", "'rotary_proj' is not in the model"),
    ("embedding", "not a LoRA A/B weight"),
    ("wrong-shape", "do not match the base model"),
    ("nan", "NaN or inf"),
    ("layer-out-of-range", "layer 99"),
    ("truncated", "cannot read adapter_model.safetensors"),
    ("dora", "DoRA"),
])
def test_broken_folders_are_named_and_explained(adapter, checkpoint, name, message):
    _break(name, adapter)
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(adapter, checkpoint.config)
    assert str(adapter) in str(err.value) and message in str(err.value), str(err.value)


def test_missing_folder(tmp_path, checkpoint):
    with pytest.raises(AdapterError, match="no such folder"):
        load_peft_adapter(tmp_path / "nope", checkpoint.config)


def test_generate_with_adapter_cli(adapter):
    from tests.test_cli import npc

    run = npc("generate", "--adapter", str(adapter), "--max-tokens", "8", "--json", "Hello")
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["token_ids"]) >= 1
    _break("pickle", adapter)
    bad = npc("generate", "--adapter", str(adapter), "Hello")
    assert bad.returncode == 2 and "pickled weights" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("step,replaced", [("_read_settings", "adapter_config.json"),
                                           ("_read_tensors", "adapter_model.safetensors")])
def test_fingerprint_names_the_bytes_the_weights_came_from(adapter, checkpoint, tmp_path, monkeypatch, step, replaced):
    """A file replaced just after it was read must not lend its hash to the weights read before (the
    prefix cache keys K/V on the fingerprint: a mismatch would reuse another adapter's K/V)."""
    from sidecar.model import lora

    read = load_peft_adapter(adapter, checkpoint.config)
    other = write_random_adapter(tmp_path / "other", checkpoint.config, seed=1, rank=8, alpha=16.0,
                                 targets=("q_proj", "v_proj", "down_proj"))
    original = getattr(lora, step)

    def then_replaced(*args, **kwargs):
        result = original(*args, **kwargs)
        (adapter / replaced).write_bytes((other / replaced).read_bytes())
        return result

    monkeypatch.setattr(lora, step, then_replaced)
    raced = load_peft_adapter(adapter, checkpoint.config)
    monkeypatch.undo()
    assert torch.equal(raced.weights[(3, "v_proj")][1], read.weights[(3, "v_proj")][1])  # the old bytes' weights
    assert raced.fingerprint == read.fingerprint  # ... under the old bytes' name
    assert load_peft_adapter(adapter, checkpoint.config).fingerprint != read.fingerprint  # the files did change


def test_loaded_weights_do_not_follow_the_file(adapter, checkpoint, tmp_path):
    """The weights are copies: a file rewritten in place after loading (same inode) leaves them as read."""
    loaded = load_peft_adapter(adapter, checkpoint.config)
    before = loaded.weights[(3, "v_proj")][0].clone()
    other = write_random_adapter(tmp_path / "other", checkpoint.config, seed=1, rank=8,
                                 targets=("q_proj", "v_proj", "down_proj"))
    with open(adapter / "adapter_model.safetensors", "r+b") as f:
        f.write((other / "adapter_model.safetensors").read_bytes())
    assert torch.equal(loaded.weights[(3, "v_proj")][0], before)


def test_character_version_and_fingerprint_name_the_same_bytes(tmp_path, checkpoint):
    from sidecar.dialogue.characters import load_character

    home = tmp_path / "elf"
    write_random_adapter(home / "adapter", checkpoint.config, seed=2, rank=4, targets=("q_proj",))
    (home / "character.yaml").write_text("id: elf\nname: Elara\npersona: x\nadapter: adapter\nlora_scale: 0.5\n")
    character = load_character(home)
    adapter = load_peft_adapter(character.adapter_path, checkpoint.config, scale=character.lora_scale)
    assert adapter.fingerprint.startswith(character.adapter_version) and adapter.fingerprint.endswith("x0.5")
