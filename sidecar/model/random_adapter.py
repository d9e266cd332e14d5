"""A PEFT LoRA folder with random weights for a model's shape: what the tests and benchmarks serve.

Written in the standard PEFT layout (adapter_config.json + adapter_model.safetensors), so the
sidecar, PEFT and llama.cpp's converter all read the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sidecar.model.config import LlamaConfig
from sidecar.model.lora import MODULES, module_shapes

TARGET_MODULES = tuple(MODULES)  # q, k, v, o, gate, up, down
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # PEFT names them under self_attn, the others under mlp


def write_random_adapter(folder: Path, config: LlamaConfig, seed: int, rank: int = 16, alpha: float = 32.0,
                         targets: tuple[str, ...] = TARGET_MODULES, std: float = 0.02,
                         dtype: torch.dtype = torch.float32) -> Path:
    """A PEFT LoRA folder with random A and non-zero B (what `init_lora_weights=False` gives).

    `dtype` is the stored type (the values are drawn in float32 either way): bf16 halves what a
    benchmark with many adapters on a large model writes and reads.
    """
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(config)
    tensors = {}
    for layer in range(config.num_layers):
        for module in targets:
            out, inp = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if module in _ATTENTION else 'mlp'}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, inp, generator=gen) * std).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out, rank, generator=gen) * std).to(dtype)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "target_modules": list(targets), "fan_in_fan_out": False, "inference_mode": True,
    }, indent=2))
    return folder
