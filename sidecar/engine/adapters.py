"""Which adapters sit in the model's LoRA slots: load on first use, LRU eviction, pinning.

Reading and validating a PEFT folder happens on a background thread, so a new character's
adapter never stalls the NPCs already talking; only the copy into a slot (milliseconds) runs in
the step loop. An adapter used by a running sequence is pinned and never evicted.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sidecar.engine.sequence import AdapterRef
from sidecar.model.config import LlamaConfig
from sidecar.model.lora import LoraAdapter, LoraSlots, load_peft_adapter


@dataclass
class _Resident:
    slot: int
    adapter: LoraAdapter
    pins: int = 0
    last_used: int = 0


class AdapterCache:
    def __init__(self, config: LlamaConfig, slots: LoraSlots, max_rank: int):
        self.config, self.slots, self.max_rank = config, slots, max_rank
        self._resident: dict[tuple[str, str], _Resident] = {}
        self._loading: dict[tuple[str, str], Future[LoraAdapter]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load")
        self._clock = 0
        self.loads = 0
        self.evictions = 0

    def acquire(self, ref: AdapterRef) -> tuple[int, str] | None:
        """(slot, fingerprint) with the adapter pinned, or None while it is loading or no slot is free.

        Raises the loader's AdapterError if the folder is unusable.
        """
        self._clock += 1
        resident = self._resident.get(ref.key)
        if resident is None:
            if ref.loaded is None and not self._read_from_disk(ref):
                return None
            slot = self._free_slot()
            if slot is None:
                return None  # every slot is pinned by a running sequence; retry next step
            # .result() raises the loader's AdapterError for a bad folder
            adapter = ref.loaded or self._loading.pop(ref.key).result()
            self.slots.load(slot, adapter)
            self.loads += 1
            resident = self._resident[ref.key] = _Resident(slot, adapter)
        resident.pins += 1
        resident.last_used = self._clock
        return resident.slot, resident.adapter.fingerprint

    def _read_from_disk(self, ref: AdapterRef) -> bool:
        """Starts reading the folder on the loader thread; True once it is read (or failed)."""
        future = self._loading.get(ref.key)
        if future is None:
            self._loading[ref.key] = self._pool.submit(load_peft_adapter, ref.path, self.config, self.max_rank,
                                                       ref.name, ref.scale)
            return False
        return future.done()

    def forget_failed(self, ref: AdapterRef) -> None:
        """Drops a failed load so a fixed folder is read again next time."""
        self._loading.pop(ref.key, None)

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

    def resident(self) -> list[str]:
        return [f"{name}@{version}" + ("" if scale == 1.0 else f"x{scale}") for name, version, scale in self._resident]

    def pinned(self, ref: AdapterRef) -> bool:
        r = self._resident.get(ref.key)
        return r is not None and r.pins > 0

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
