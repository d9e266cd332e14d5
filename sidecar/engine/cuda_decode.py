"""Decode steps on a GPU: the batch's tokens go through `LlamaModel.decode`, replayed from captured
CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is a few hundred short kernels; launched one by one from Python,
the launches take longer than the arithmetic. A captured graph launches them all at once. A step
can be captured because `decode` reads tokens, positions and adapter slots from device buffers,
and its attention reads each row's length from a tensor: nothing in it depends on a host value.

A batch of n rows replays the smallest bucket >= n. The padding rows decode token 0 at position 0
of cache rows that no sequence holds (running sequences hold rows 0..n-1, and a sequence's K/V is
copied in whole when it moves into a row), with no adapter. The LoRA stacks are captured by
address: when LoraSlots reallocates them (an adapter of a higher rank arrives), the graphs are
captured again before the next replay.
"""

from __future__ import annotations

import structlog
import torch
from tqdm import tqdm

from sidecar.model.llama import KVCache, LlamaModel
from sidecar.model.lora import LoraBatch, LoraSlots

log = structlog.get_logger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch (and max_batch itself)."""
    small = [b for b in (1, 2, 4) if b < max_batch]
    return sorted({*small, *range(8, max_batch + 1, 8), max_batch})


class CudaDecoder:
    """Runs decode steps for rows 0..n-1 of `cache`; with `graphs`, from captured CUDA graphs."""

    def __init__(self, model: LlamaModel, cache: KVCache, slots: LoraSlots, max_batch: int, graphs: bool = True,
                 progress: bool = False):
        self.model, self.cache, self.slots = model, cache, slots
        self.buckets = batch_buckets(max_batch)
        self.use_graphs, self.progress = graphs, progress
        # Inputs of every step (rows: token, position, adapter slot), filled by one copy per step;
        # a graph reads them where they were when it was captured.
        self.inputs = torch.zeros(3, max_batch, dtype=torch.int64, device=model.device)
        self.tokens, self.positions, self.row_slot = self.inputs[0].unsqueeze(1), self.inputs[1], self.inputs[2]
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: torch.Tensor | None = None  # what the graphs write (allocated when they are captured)
        self._captured_generation: int | None = None

    def run(self, tokens: list[int], positions: list[int], row_slots: list[int]) -> torch.Tensor:
        """float32 logits [n, V] of one decode step; row i writes its K/V at positions[i] of cache row i."""
        n = len(tokens)
        size = next(b for b in self.buckets if b >= n)
        pad = size - n
        host = torch.tensor([tokens + [0] * pad, positions + [0] * pad, row_slots + [-1] * pad], dtype=torch.int64)
        self.inputs[:, :size].copy_(host)
        if self.use_graphs and self._captured_generation != self.slots.generation:
            self.capture()
        if not self.use_graphs:
            return self._step(size)[:n]
        self._graphs[size].replay()
        return self.logits[:n]

    def _step(self, size: int) -> torch.Tensor:
        lora = LoraBatch.for_graph(self.slots, self.row_slot[:size])
        return self.model.decode(self.tokens[:size], self.positions[:size], self.cache, lora)

    def capture(self) -> None:
        """Captures one graph per bucket, largest first, all sharing one memory pool. If capturing
        fails (out of memory, a kernel the GPU cannot run), decode goes on eagerly, with a warning."""
        # The warm-up run before each capture executes for real: it writes K/V at position 0 of rows
        # 0..size-1, which running sequences may hold. Keep those positions and put them back after.
        rows = self.buckets[-1]
        saved_k = self.cache.k_all[:, :rows, :, 0].clone()
        saved_v = self.cache.v_all[:, :rows, :, 0].clone()
        saved_inputs = self.inputs.clone()
        self.inputs[:2].zero_()
        self.inputs[2].fill_(-1)
        self._graphs.clear()
        try:
            self._capture_all()
            self._captured_generation = self.slots.generation
        except Exception as e:  # noqa: BLE001 (any failure: serve without graphs rather than not at all)
            self._graphs.clear()
            self.use_graphs = False
            log.warning("capturing CUDA graphs failed; decode steps run without them", error=f"{type(e).__name__}: {e}")
        finally:
            torch.cuda.synchronize()
            self.cache.k_all[:, :rows, :, 0] = saved_k
            self.cache.v_all[:, :rows, :, 0] = saved_v
            self.inputs.copy_(saved_inputs)

    def _capture_all(self) -> None:
        # One logits buffer for every bucket: a graph writes its rows into it, so memory does not
        # grow with the number of buckets (a 128K vocabulary makes each row 0.5 MB).
        self.logits = torch.empty(self.buckets[-1], self.model.config.vocab_size, device=self.model.device)
        pool = None
        for size in tqdm(sorted(self.buckets, reverse=True), desc="capturing CUDA graphs", unit="graph",
                         disable=not self.progress):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the Triton kernels and sets up cuBLAS outside the capture
                self._step(size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[:size].copy_(self._step(size))
            pool = pool or graph.pool()
            self._graphs[size] = graph
