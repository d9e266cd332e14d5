"""Loading the base model the engine serves: checkpoint -> weights in memory + tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sidecar.config import ModelConfig
from sidecar.engine.tokenizer import Tokenizer
from sidecar.errors import UserError
from sidecar.model.checkpoint import Checkpoint, load_checkpoint
from sidecar.model.llama import LlamaModel


@dataclass(frozen=True)
class BaseModel:
    path: Path
    model: LlamaModel
    tokenizer: Tokenizer

    @property
    def weights(self) -> str:
        return self.model.weights


def choose_weight_format(ckpt: Checkpoint) -> str:
    """What `--weights auto` means for this checkpoint.

    int4 decodes fastest on this kind of CPU at batch 1 and 8 (docs/benchmarks.md) and is exact
    for 4-bit sources; an 8-bit or float source would lose precision at int4, so it gets int8.
    """
    kinds = {t.kind for name, t in ckpt.tensors.items() if name.startswith("layers.") and len(t.shape) == 2}
    if kinds <= {"Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K"}:
        return "int4"
    return "int8"


def load_base_model(config: ModelConfig, progress: bool = False) -> BaseModel:
    device = config.resolved_device()
    ckpt = load_checkpoint(config.path)
    if config.weights != "auto":
        weights = config.weights
    elif device.startswith("cuda"):
        weights = "bf16"  # a GPU has the memory and bf16 tensor cores; exact for any source format
    else:
        weights = choose_weight_format(ckpt)
    if device.startswith("cuda"):
        import torch

        # Streams, graph captures and Triton launches use the thread's current device: make it ours
        # (this thread is the one that runs the model).
        torch.cuda.set_device(device)
        if weights == "int4" and torch.cuda.get_device_capability(device) < (8, 0):
            raise UserError(f"--weights int4 on {torch.cuda.get_device_name(device)}: torch's int4 GPU kernel needs "
                            "compute capability 8.0 or newer (Ampere); use --weights bf16")
    model = LlamaModel.from_checkpoint(ckpt, weights, progress=progress, device=device)
    return BaseModel(config.path, model, Tokenizer(ckpt))
