"""Shared fixtures. The real embedded model and its transformers reference load once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sidecar.config import embedded_model_path
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
