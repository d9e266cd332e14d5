"""TensorRT-LLM's side of the characters' adapters: LoraConfig arguments, one int id per
(character, adapter version, scale), and each validated adapter rewritten as a PEFT folder in the
one form TensorRT-LLM's loader reads unambiguously (one rank, lora_alpha = r, lora_scale folded
into B). Pure Python and torch: tested without TensorRT-LLM (tests/test_backend_tensorrt_llm.py)."""

from __future__ import annotations

import json
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sidecar.engine.api import AdapterRef, adapter_label
from sidecar.errors import UserError
from sidecar.model.lora import LoraAdapter

# PEFT module name -> TensorRT-LLM's name for it (its default trtllm_modules_to_hf_modules).
TRTLLM_MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_dense",
                  "gate_proj": "mlp_h_to_4h", "up_proj": "mlp_gate", "down_proj": "mlp_4h_to_h"}
_PEFT_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def lora_config_kwargs(max_rank: int, max_loras: int, max_cpu_loras: int) -> dict[str, Any]:
    """Keyword arguments for TensorRT-LLM's LoraConfig.

    No `lora_dir`: given exactly one, TensorRT-LLM reads that adapter at start to guess the target
    modules; characters (and their modules) change while the sidecar runs, so every module an
    adapter may target is listed instead, and each adapter comes with its request (LoRARequest).
    max_loras adapters sit on the GPU at once, max_cpu_loras in host memory.
    """
    if min(max_rank, max_loras, max_cpu_loras) < 1:
        raise UserError("max_rank, max_loras and max_cpu_loras must be at least 1")
    if max_cpu_loras < max_loras:
        raise UserError(f"max_cpu_loras ({max_cpu_loras}) must be at least max_loras ({max_loras})")
    return {"lora_dir": [], "lora_target_modules": list(TRTLLM_MODULES.values()),
            "trtllm_modules_to_hf_modules": {trt: hf for hf, trt in TRTLLM_MODULES.items()},
            "max_lora_rank": max_rank, "max_loras": max_loras, "max_cpu_loras": max_cpu_loras}


AdapterKey = tuple[str, str, float]


class LoraIds:
    """(character, adapter version, scale) -> the int id TensorRT-LLM knows that adapter by.

    TensorRT-LLM reads an adapter's files the first time it sees an id and serves its cached copy
    for that id from then on, so an id must never stand for other weights: a new version (or
    scale) gets a new id, and ids are never reused. The map keeps the `max_entries` most recently
    used keys; older ones are forgotten (`on_forget(id)`), except ids pinned by requests in flight.
    """

    def __init__(self, max_entries: int = 64, on_forget: Callable[[int], None] | None = None):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.on_forget = on_forget
        self._ids: OrderedDict[AdapterKey, int] = OrderedDict()
        self._pins: dict[int, int] = {}
        self._next = 1  # ids start at 1: positive, and never 0 (some code reads 0 / -1 as "no adapter")

    def id_for(self, key: AdapterKey) -> int:
        lora_id = self._ids.get(key)
        if lora_id is None:
            lora_id = self._ids[key] = self._next
            self._next += 1
        self._ids.move_to_end(key)
        self._trim()
        return lora_id

    def request_args(self, ref: AdapterRef | None) -> tuple[str, int, str] | None:
        """(lora_name, lora_int_id, lora_path) for tensorrt_llm's LoRARequest; None for the base model."""
        if ref is None:
            return None
        return ref.label, self.id_for(ref.key), str(ref.path)

    def pin(self, lora_id: int) -> None:
        self._pins[lora_id] = self._pins.get(lora_id, 0) + 1

    def unpin(self, lora_id: int) -> None:
        left = self._pins.get(lora_id, 0) - 1
        if left > 0:
            self._pins[lora_id] = left
        else:
            self._pins.pop(lora_id, None)
            self._trim()

    def _trim(self) -> None:
        excess = len(self._ids) - self.max_entries
        for key in list(self._ids)[:-1]:  # oldest first; never the one just used
            if excess <= 0:
                return
            lora_id = self._ids[key]
            if lora_id in self._pins:
                continue
            del self._ids[key]
            excess -= 1
            if self.on_forget is not None:
                self.on_forget(lora_id)

    def resident(self) -> list[str]:
        return [adapter_label(key) for key in self._ids]

    def __len__(self) -> int:
        return len(self._ids)


def write_peft_snapshot(adapter: LoraAdapter, folder: Path) -> Path:
    """Writes a validated adapter as a PEFT folder that means to TensorRT-LLM what it means to us.

    TensorRT-LLM's PEFT reader takes one `r` and one `lora_alpha` for all modules and knows no
    rank_pattern / alpha_pattern; it has no per-request scale either. So: every module zero-padded
    to the adapter's largest rank r (the product B @ A is unchanged), lora_alpha = r and no rsLoRA
    (scale 1), with alpha / r and the character's lora_scale already folded into B (LoraAdapter).
    Written to a temporary folder and renamed, so a reader never sees half a snapshot.
    """
    folder = Path(folder)
    rank = adapter.rank
    tensors: dict[str, torch.Tensor] = {}
    for (layer, module), (a, b) in sorted(adapter.weights.items()):
        prefix = f"base_model.model.model.layers.{layer}.{_PEFT_PARENT[module]}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = F.pad(a.float(), (0, 0, 0, rank - a.shape[0])).contiguous()  # [r, in]
        tensors[f"{prefix}.lora_B.weight"] = F.pad(b.float(), (0, rank - b.shape[1])).contiguous()  # [out, r]
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(tensors, partial / "adapter_model.safetensors", metadata={"format": "pt"})
    (partial / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "use_rslora": False,
        "target_modules": sorted(adapter.target_modules), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": None,
    }, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


class AdapterSnapshots:
    """The adapter folders TensorRT-LLM reads: `root/<lora id>`, written once per id.

    The weights come from `AdapterRef.loaded` (the version the server validated), never from files
    that may have changed after their version was checked. `folder()` blocks: run it on a thread.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._forgotten: set[int] = set()

    def folder(self, lora_id: int, ref: AdapterRef) -> Path:
        """The snapshot folder for this id (written on first use)."""
        folder = self.root / str(lora_id)
        with self._lock:
            self._delete_forgotten()
            if not folder.is_dir():
                write_peft_snapshot(ref.loaded, folder)
        return folder

    def forget(self, lora_id: int) -> None:
        """Marks an id's folder for deletion (done by the next folder() call, off the event loop)."""
        with self._lock:
            self._forgotten.add(lora_id)

    def _delete_forgotten(self) -> None:
        for lora_id in self._forgotten:
            shutil.rmtree(self.root / str(lora_id), ignore_errors=True)
        self._forgotten.clear()
