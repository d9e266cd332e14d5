"""Adapters in the torch engine: reading one into an AdapterRef (any backend), and which validated
adapters sit in the model's LoRA slots (LRU, pinned while a sequence uses one).

Reading and validating happens when a ref is made (`read_adapter`: the registry's scanning thread,
a bench, a test), never in the step loop; the step loop only copies validated weights into a free
slot (milliseconds). `AdapterCache` is touched by the engine thread alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sidecar.engine.api import AdapterRef
from sidecar.model.config import LlamaConfig
from sidecar.model.lora import LoraSlots, load_peft_adapter


def read_adapter(shape: LlamaConfig, max_rank: int, name: str, path: Path, version: str,
                 scale: float = 1.0, dtype: torch.dtype = torch.float32) -> AdapterRef:
    """Reads and validates a PEFT folder against the base model's shape; raises AdapterError. `dtype`: what the
    weights are held in (the torch engine's model dtype; float32 for the backends that hand them on)."""
    adapter = load_peft_adapter(Path(path), shape, max_rank, name, scale, dtype)
    return AdapterRef(name, Path(path), version, scale, adapter)


@dataclass
class _Resident:
    slot: int
    ref: AdapterRef
    pins: int = 0
    last_used: int = 0


class AdapterCache:
    def __init__(self, slots: LoraSlots):
        self.slots = slots
        self._resident: dict[tuple[str, str, float], _Resident] = {}
        self._clock = 0
        self._labels: tuple[str, ...] = ()  # resident adapters' labels, rebuilt only when they change
        self.loads = 0
        self.evictions = 0

    def acquire(self, ref: AdapterRef) -> tuple[int, str] | None:
        """(slot, fingerprint) with the adapter pinned, or None while every slot is pinned."""
        self._clock += 1
        resident = self._resident.get(ref.key)
        if resident is None:
            slot = self._free_slot()
            if slot is None:
                return None  # every slot is pinned by a running sequence; retry next step
            self.slots.load(slot, ref.loaded)
            self.loads += 1
            resident = self._resident[ref.key] = _Resident(slot, ref)
            self._labels = tuple(r.ref.label for r in self._resident.values())
        resident.pins += 1
        resident.last_used = self._clock
        return resident.slot, resident.ref.loaded.fingerprint

    def release(self, ref: AdapterRef) -> None:
        resident = self._resident.get(ref.key)
        if resident is not None and resident.pins > 0:
            resident.pins -= 1

    def _free_slot(self) -> int | None:
        used = {r.slot for r in self._resident.values()}
        for slot in range(self.slots.num_slots):
            if slot not in used:
                return slot
        idle = [(r.last_used, key) for key, r in self._resident.items() if r.pins == 0]
        if not idle:
            return None
        _, key = min(idle)
        victim = self._resident.pop(key)
        self.slots.clear(victim.slot)
        self.evictions += 1
        return victim.slot

    def resident(self) -> tuple[str, ...]:
        """Labels of the resident adapters (read for the stats snapshot after every step: kept, not built)."""
        return self._labels

    def pinned(self, ref: AdapterRef) -> bool:
        r = self._resident.get(ref.key)
        return r is not None and r.pins > 0
