"""Shared fixtures. The real embedded model and its transformers reference load once per session."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before anything imports the CUDA
# path's kernels, so that without a GPU they run (slowly) in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest

from sidecar.config import EngineConfig, embedded_model_path
from sidecar.engine.api import AdapterRef, EngineEvent, SamplingParams
from sidecar.engine.base_model import BaseModel
from sidecar.engine.llm_engine import LLMEngine
from sidecar.engine.tokenizer import Tokenizer
from sidecar.model.checkpoint import Checkpoint, load_checkpoint
from sidecar.model.llama import LlamaModel

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def model_path() -> Path:
    return embedded_model_path()


@pytest.fixture(scope="session")
def checkpoint(model_path: Path) -> Checkpoint:
    return load_checkpoint(model_path)


@pytest.fixture(scope="session")
def tokenizer(checkpoint: Checkpoint) -> Tokenizer:
    return Tokenizer(checkpoint)


@pytest.fixture(scope="session")
def models(checkpoint: Checkpoint):
    """Our model in each weight format, built on first use."""
    cache: dict[str, LlamaModel] = {}

    def get(weights: str) -> LlamaModel:
        if weights not in cache:
            cache[weights] = LlamaModel.from_checkpoint(checkpoint, weights)
        return cache[weights]

    return get


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    """transformers loading the same GGUF (it dequantizes to fp32): the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)


# Adapters made by PEFT itself on the embedded model (random, non-zero B): name -> LoraConfig kwargs.
PEFT_ADAPTERS = {
    "alpha": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]),
    "beta": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "gamma": dict(r=16, lora_alpha=16, target_modules=["o_proj", "gate_proj", "down_proj"]),
    "delta": dict(r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"]),
}


@pytest.fixture(scope="session")
def peft_reference(hf_model, tmp_path_factory):
    """(PeftModel holding every adapter in PEFT_ADAPTERS, {name: saved adapter folder})."""
    import copy

    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(1234)
    names = list(PEFT_ADAPTERS)
    config = lambda name: LoraConfig(init_lora_weights=False, lora_dropout=0.0, **PEFT_ADAPTERS[name])  # noqa: E731
    peft_model = get_peft_model(copy.deepcopy(hf_model), config(names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config(name))
    folders = {}
    for name in names:
        peft_model.save_pretrained(root / name, selected_adapters=[name])
        folders[name] = next((root / name).rglob("adapter_config.json")).parent
    peft_model.eval()
    return peft_model, folders


def engine_generate(model: LlamaModel, tokenizer: Tokenizer, ids: list[int], params: SamplingParams,
                    adapter_folder: Path | None = None) -> EngineEvent:
    """One request through the engine's own step loop (what `npc generate` runs), on this thread; its
    finished event."""
    config = EngineConfig(max_batch=1, max_seq_len=len(ids) + params.max_tokens, prefix_cache_mb=0)
    engine = LLMEngine(BaseModel(Path("model"), model, tokenizer), config)
    adapter: AdapterRef | None = engine.load_adapter("adapter", adapter_folder, "1") if adapter_folder else None
    events: list[EngineEvent] = []
    engine.add(engine.make_sequence(ids, adapter, params, events.append))
    while engine.has_work():
        engine.step()
    assert events[-1].kind == "finished", events[-1]
    return events[-1]
