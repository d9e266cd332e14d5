"""The engine's CUDA path without a GPU: what can be checked here is checked here.

- Device placement: the model built on the "meta" device runs prefill, decode and every LoRA path;
  a tensor left on the CPU by mistake fails there as it would on a GPU.
- `LlamaModel.decode` (the graph-capturable step: device buffers, Triton decode attention, Triton
  BGMV) against `forward` on the same cache, adapters mixed per row; CudaDecoder's bucket padding.
  Without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1).
- ModelConfig's device checks.
The tests that need a GPU (graph replay, bf16 / int4 on CUDA, the engine end to end) are in
tests/test_gpu.py and skip without one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sidecar.config import ModelConfig
from sidecar.errors import UserError
from sidecar.model.checkpoint import load_checkpoint
from sidecar.model.cuda import triton_available
from sidecar.model.llama import LlamaModel
from sidecar.model.lora import LoraAdapter, LoraBatch, LoraSlots, module_shapes
from tests.tiny import tiny_hf_folder

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton (the dev extra) and either CUDA or TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_hf_folder(folder)
    return load_checkpoint(folder)


def random_adapter(config, seed: int, rank: int, targets=None) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(config.num_layers):
        for module, (out, inp) in module_shapes(config).items():
            if targets is None or module in targets:
                weights[(layer, module)] = (torch.randn(rank, inp, generator=gen) * 0.05,
                                            torch.randn(out, rank, generator=gen) * 0.05)
    return LoraAdapter(f"a{seed}", Path("."), str(seed), rank, weights)


def prefilled(model: LlamaModel, slots: LoraSlots, prompts: list[list[int]], row_slots: list[int], rows: int):
    """A cache with prompt i prefilled in row i under adapter slot row_slots[i]."""
    cache = model.new_cache(rows=rows, max_len=96)
    for row, (prompt, slot) in enumerate(zip(prompts, row_slots, strict=True)):
        lora = LoraBatch(slots, [slot], len(prompt)) if slot >= 0 else None
        model.forward(torch.tensor([prompt]), start=[0], rows=[row], cache=cache, lora=lora)
    return cache


def test_model_on_meta_device_keeps_every_tensor_there(checkpoint):
    """Shapes-only run: any CPU tensor mixed into the arithmetic raises ("not on the expected device")."""
    model = LlamaModel.from_checkpoint(checkpoint, "bf16", device="meta")
    slots = LoraSlots(model.config, num_slots=3, dtype=model.dtype, device="meta")
    slots.load(0, random_adapter(model.config, 0, 4))
    slots.load(2, random_adapter(model.config, 1, 8, targets=("q_proj", "down_proj")))  # grows the rank
    cache = model.new_cache(rows=4, max_len=64)
    assert cache.k_all.device.type == "meta" and slots.A[0]["qkv"].device.type == "meta"
    for row, slot in enumerate([0, 2, -1]):  # prefill: causal, one adapter (segment path)
        lora = LoraBatch(slots, [slot], 7) if slot >= 0 else None
        assert model.forward(torch.tensor([[5] * 7]), start=[0], rows=[row], cache=cache, lora=lora).shape == (1, 512)
    # a chunked prefill (additive mask), then a ragged mixed-adapter decode (masked all-slot path)
    model.forward(torch.tensor([[6] * 3]), start=[7], rows=[3], cache=cache, lora=LoraBatch(slots, [0], 3))
    logits = model.forward(torch.tensor([[1], [2], [3]]), start=[7, 7, 10], rows=[0, 1, 2], cache=cache,
                           lora=LoraBatch(slots, [0, 2, -1], 1))
    assert logits.shape == (3, 512) and logits.device.type == "meta"


@kernels
@pytest.mark.parametrize("row_slots", [[0, 2, -1, 1], [1, 1, 1, 1], [-1, -1, -1, -1]])
def test_decode_step_matches_forward(checkpoint, row_slots):
    """`decode` (Triton attention with per-row lengths, Triton BGMV) == `forward` (SDPA, masked torch LoRA)."""
    model = LlamaModel.from_checkpoint(checkpoint, "fp32", device=DEVICE)
    slots = LoraSlots(model.config, num_slots=3, dtype=model.dtype, device=DEVICE)
    for slot, (seed, rank) in enumerate([(0, 4), (1, 12), (2, 8)]):
        slots.load(slot, random_adapter(model.config, seed, rank))
    prompts = [[3, 9, 27, 81, 243][: 2 + i] + list(range(10, 10 + 7 * i)) for i in range(4)]  # ragged lengths
    reference_cache = prefilled(model, slots, prompts, row_slots, rows=5)
    cache = prefilled(model, slots, prompts, row_slots, rows=5)
    tokens, positions = [[7], [8], [9], [10]], [len(p) for p in prompts]

    expected = model.forward(torch.tensor(tokens), start=positions, rows=[0, 1, 2, 3], cache=reference_cache,
                             lora=LoraBatch(slots, row_slots, 1, kernel=False))
    got = model.decode(torch.tensor(tokens, device=DEVICE), torch.tensor(positions, device=DEVICE), cache,
                       LoraBatch.for_graph(slots, torch.tensor(row_slots, device=DEVICE)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.k_all, reference_cache.k_all, rtol=1e-5, atol=1e-5)  # same K/V written
    assert not torch.equal(got[0], got[1])  # rows differ: the comparison is not trivially equal


@kernels
def test_cuda_decoder_pads_to_a_bucket_without_touching_real_rows(checkpoint):
    from sidecar.engine.cuda_decode import CudaDecoder, batch_buckets

    assert batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(1) == [1] and batch_buckets(3) == [1, 2, 3]
    model = LlamaModel.from_checkpoint(checkpoint, "fp32", device=DEVICE)
    slots = LoraSlots(model.config, num_slots=2, dtype=model.dtype, device=DEVICE)
    slots.load(1, random_adapter(model.config, 5, 6))
    prompts, row_slots = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15]], [1, -1, 1]
    reference_cache = prefilled(model, slots, prompts, row_slots, rows=5)
    cache = prefilled(model, slots, prompts, row_slots, rows=5)
    positions = [len(p) for p in prompts]
    expected = model.forward(torch.tensor([[20], [21], [22]]), start=positions, rows=[0, 1, 2],
                             cache=reference_cache, lora=LoraBatch(slots, row_slots, 1, kernel=False))
    decoder = CudaDecoder(model, cache, slots, max_batch=4, graphs=False)
    got = decoder.run([20, 21, 22], positions, row_slots)  # 3 rows -> the 4-row bucket
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.k_all[:, :3], reference_cache.k_all[:, :3], rtol=1e-5, atol=1e-5)


def test_device_flag_is_checked():
    for bad in ("gpu", "cuda:x", "cuda0", "tpu"):
        with pytest.raises(UserError, match="--device"):
            ModelConfig(Path("m.gguf"), device=bad)
    with pytest.raises(UserError, match="int8 runs on the CPU only"):
        ModelConfig(Path("m.gguf"), weights="int8", device="cuda")
    assert ModelConfig(Path("m.gguf"), device="auto").resolved_device() == DEVICE
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            ModelConfig(Path("m.gguf"), device="cuda:0").resolved_device()
