"""Loading the base model the engine serves: checkpoint -> weights in memory + tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from sidecar.config import PROMPT_COPY_LIMIT_MB, ModelConfig
from sidecar.engine.tokenizer import Tokenizer
from sidecar.errors import UserError
from sidecar.model.checkpoint import load_checkpoint
from sidecar.model.llama import LlamaModel

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class BaseModel:
    path: Path
    model: LlamaModel
    tokenizer: Tokenizer

    @property
    def weights(self) -> str:
        return self.model.weights


def describe_formats(model: LlamaModel) -> str:
    """What each stored kind became, for the startup log: "Q4_K -> int4 x154, Q6_K -> int8 x14, ..."."""
    return ", ".join(f"{kind} -> {fmt} x{count}" for (kind, fmt), count in sorted(model.became.items()))


def wants_prompt_copies(choice: str, copy_mb: float) -> bool:
    """--prompt-weights: bf16 copies for prompt chunks where this CPU multiplies bf16 natively (AVX512-BF16 or
    AMX: 2x the int4 kernel's prompt speed on an AMD EPYC, docs/benchmarks.md), unless the copy is large."""
    if choice != "auto":
        return choice == "bf16"
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return native and copy_mb <= PROMPT_COPY_LIMIT_MB


def load_base_model(config: ModelConfig, progress: bool = False) -> BaseModel:
    device = config.resolved_device()
    ckpt = load_checkpoint(config.path)
    if config.weights != "auto":
        weights = config.weights
    elif device.startswith("cuda"):
        weights = "bf16"  # a GPU has the memory and bf16 tensor cores; exact for any source format
    else:
        weights = "auto"  # per matrix: int4 for 4-bit sources, int8 for finer ones (quant.INT4_SOURCES)
    if device.startswith("cuda"):
        import torch

        # Streams, graph captures and Triton launches use the thread's current device: make it ours
        # (this thread is the one that runs the model).
        torch.cuda.set_device(device)
        if weights == "int4" and torch.cuda.get_device_capability(device) < (8, 0):
            raise UserError(f"--weights int4 on {torch.cuda.get_device_name(device)}: torch's int4 GPU kernel needs "
                            "compute capability 8.0 or newer (Ampere); use --weights bf16")
    model = LlamaModel.from_checkpoint(ckpt, weights, progress=progress, device=device)
    copy_mb = model.prompt_copy_bytes() / 2**20
    prompt_weights = "same"
    if device == "cpu" and copy_mb and wants_prompt_copies(config.prompt_weights, copy_mb):
        model.hold_prompt_copies()
        prompt_weights = "bf16"
    log.info("weights loaded", file=config.path.name, architecture=ckpt.config.architecture, weights=model.weights,
             formats=describe_formats(model), prompt_chunks=prompt_weights,
             **({"prompt_copy_mb": round(copy_mb)} if prompt_weights == "bf16" else {}))
    return BaseModel(config.path, model, Tokenizer(ckpt))
