"""The multi-NPC workload shared by every system in `npc bench --scenario multi-npc`.

N NPCs, each with its own random rank-16 LoRA adapter on q,k,v,o,gate,up,down (written as a
standard PEFT folder, so PEFT, llama.cpp's converter and the sidecar all read the same files),
a persona prompt of about 150 tokens and a short player line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sidecar.model.config import LlamaConfig
from sidecar.model.lora import module_shapes

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODULE_PREFIX = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

ROLES = ["blacksmith", "innkeeper", "ranger", "alchemist", "guard captain", "bard", "merchant", "hermit",
         "ferryman", "librarian", "cartographer", "beekeeper", "miner", "herbalist", "knight", "fisher"]
PLAYER_LINES = ["Have you heard any rumours lately?", "What can you sell me?", "Who rules this town?",
                "I need a place to stay tonight.", "Is the north road safe?", "Tell me about yourself."]


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
            prefix = f"base_model.model.model.layers.{layer}.{_MODULE_PREFIX[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, inp, generator=gen) * std).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out, rank, generator=gen) * std).to(dtype)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "target_modules": list(targets), "fan_in_fan_out": False, "inference_mode": True,
    }, indent=2))
    return folder


def persona(i: int) -> str:
    """A persona system prompt of roughly 150 tokens, different for every NPC."""
    role = ROLES[i % len(ROLES)]
    return (
        f"You are Npc{i}, the {role} of the village of Greywater, a quiet place on the edge of the Ashen Marsh. "
        f"You have lived here for {20 + i} years and you know every family, every debt and every secret. "
        "You speak plainly, with short sentences, and you never admit that you are an artificial "
        "intelligence or a character in a game. If the player asks about things outside the world, "
        "you are puzzled and change the subject to village matters. You like honest travellers and "
        "you distrust the tax collectors who come from the capital every autumn. Recently strange "
        "lights have been seen over the marsh at night, three sheep have gone missing, and the old "
        "well has started to smell of sulphur. You suspect the miller knows more than he says. "
        "Answer the player in character, in one or two sentences."
    )


def player_line(i: int) -> str:
    return PLAYER_LINES[i % len(PLAYER_LINES)]
