"""Where every sequence's K/V lives (`KvRows`), and the prefix cache that lets a persona's K/V be
computed once (`PrefixCache`). The only module that moves K/V between rows.

Rows: running sequences occupy rows 0..n-1 of the model's KVCache, in the order of the running
list, so a decode step reads the cache as a view. One extra row after them is the staging row
where a new prompt is prefilled (and a scoring request's candidates are scored), and one more the
shadow's staging row (a contrasted reply's second prompt, Sequence.shadow); when a reply's
prefill completes it is copied into row n (its shadow into n + 1). When a sequence leaves, the last
running row moves into its place.

Prefix cache: after a prompt is prefilled, the K/V of its longest block-aligned prefix is saved,
keyed by (adapter identity, tokens). A later prompt with the same adapter whose tokens start the
same way copies that K/V in and prefills only the rest. The adapter identity is the fingerprint
of the adapter's files, so K/V is never reused under another adapter or after a file changed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sidecar.model.llama import KVCache

if TYPE_CHECKING:
    from sidecar.engine.sequence import Sequence


@dataclass
class _Entry:
    k: torch.Tensor  # [layers, kv_heads, length, head_dim]
    v: torch.Tensor
    keys: list[tuple]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PrefixCache:
    def __init__(self, capacity_bytes: int, block: int = 16):
        self.capacity = capacity_bytes
        self.block = block
        self._index: dict[tuple, tuple[int, int]] = {}  # (adapter, tokens prefix) -> (entry id, length)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU order
        self._next_id = 0
        self.used = 0
        self.hits = 0
        self.lookups = 0

    def _lengths(self, n: int) -> range:
        """Block-aligned prefix lengths of an n-token prompt, longest first. At least one prompt
        token is always left to prefill, since its logits give the first reply token."""
        top = ((n - 1) // self.block) * self.block
        return range(top, 0, -self.block)

    def lookup(self, adapter: str, tokens: list[int], cache: KVCache, row: int) -> int:
        """Copies the longest cached prefix into `row`; returns its length (0 on a miss)."""
        self.lookups += 1
        for length in self._lengths(len(tokens)):
            hit = self._index.get((adapter, tuple(tokens[:length])))
            if hit is None:
                continue
            entry = self._entries[hit[0]]
            self._entries.move_to_end(hit[0])
            cache.reserve(length)
            cache.k_all[:, row, :, :length] = entry.k[:, :, :length]
            cache.v_all[:, row, :, :length] = entry.v[:, :, :length]
            self.hits += 1
            return length
        return 0

    def insert(self, adapter: str, tokens: list[int], cache: KVCache, row: int) -> None:
        """Saves the K/V of the prompt's longest block-aligned prefix (if not cached already)."""
        lengths = list(self._lengths(len(tokens) + 1))  # a stored prefix may cover the whole prompt
        if not lengths or (adapter, tuple(tokens[: lengths[0]])) in self._index:
            return
        length = lengths[0]
        entry = _Entry(cache.k_all[:, row, :, :length].clone(), cache.v_all[:, row, :, :length].clone(), [])
        if entry.nbytes > self.capacity:
            return
        while self.used + entry.nbytes > self.capacity and self._entries:
            self._evict()
        entry_id, self._next_id = self._next_id, self._next_id + 1
        for n in lengths:  # every shorter block-aligned prefix points into the same entry
            key = (adapter, tuple(tokens[:n]))
            if key not in self._index:
                self._index[key] = (entry_id, n)
                entry.keys.append(key)
        self._entries[entry_id] = entry
        self.used += entry.nbytes

    def _evict(self) -> None:
        _, entry = self._entries.popitem(last=False)
        for key in entry.keys:
            self._index.pop(key, None)
        self.used -= entry.nbytes

    def clear(self) -> None:
        self._index.clear()
        self._entries.clear()
        self.used = 0


class KvRows:
    """The running sequences in KV-row order, the staging row, and the prefix cache behind both."""

    def __init__(self, cache: KVCache, max_batch: int, prefix: PrefixCache):
        self.cache, self.max_batch, self.prefix = cache, max_batch, prefix
        self.running: list[Sequence] = []  # running[i] holds row i
        self.staging_row, self.shadow_row = max_batch, max_batch + 1

    ROWS_BEYOND_BATCH = 2  # the staging rows: the cache holds max_batch + 2 rows

    @property
    def free_rows(self) -> int:
        return self.max_batch - len(self.running)

    def staging_row_of(self, seq: Sequence) -> int:
        return self.shadow_row if seq.shadow_of is not None else self.staging_row

    def stage(self, seq: Sequence) -> int:
        """Puts the longest cached prefix of seq's prompt into its staging row; returns its length."""
        return self.prefix.lookup(seq.adapter_key, seq.prompt, self.cache, self.staging_row_of(seq))

    def keep_prefix(self, seq: Sequence) -> None:
        """The whole prompt is in its staging row: its block-aligned prefix goes to the prefix cache."""
        self.prefix.insert(seq.adapter_key, seq.prompt, self.cache, self.staging_row_of(seq))

    def promote(self, seq: Sequence) -> None:
        """The whole prompt is in its staging row: keep its prefix, give the sequence the next running row."""
        self.keep_prefix(seq)
        self.cache.copy_row(self.staging_row_of(seq), len(self.running), seq.num_computed)
        self.running.append(seq)

    def release(self, seq: Sequence) -> None:
        """Frees a running sequence's row: the last running row moves into it (one copy of all layers)."""
        i, last = self.running.index(seq), len(self.running) - 1
        if i != last:
            moved = self.running[last]
            self.cache.copy_row(last, i, moved.num_computed)
            self.running[i] = moved
        self.running.pop()
