"""Batched LoRA ops against a slow float32 loop over rows, for many batch shapes and adapter mixes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sidecar.model.config import LlamaConfig
from sidecar.model.lora import PROJECTIONS, LoraAdapter, LoraBatch, LoraSlots, module_shapes

CONFIG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, rms_eps=1e-5, rope_theta=10000.0, max_position=64, tie_embeddings=True)
ALL = tuple(module_shapes(CONFIG))


def random_adapter(seed: int, rank: int, targets: tuple[str, ...] = ALL, dtype: torch.dtype = torch.float32
                   ) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(CONFIG.num_layers):
        for module in targets:
            out, inp = module_shapes(CONFIG)[module]
            weights[(layer, module)] = (torch.randn(rank, inp, generator=gen).to(dtype),
                                        torch.randn(out, rank, generator=gen).to(dtype))
    return LoraAdapter(f"a{seed}", Path("."), str(seed), rank, weights)


ADAPTERS = [random_adapter(0, 4), random_adapter(1, 8, ("q_proj", "v_proj", "down_proj")),
            random_adapter(2, 16), random_adapter(3, 2, ("o_proj", "gate_proj"))]


def reference_delta(x: torch.Tensor, layer: int, projection: str, adapter: LoraAdapter | None) -> torch.Tensor:
    """The slow float32 definition: sum over the projection's parts of (x @ A.T) @ B.T, side by side."""
    outs = []
    for module in PROJECTIONS[projection]:
        out = module_shapes(CONFIG)[module][0]
        pair = None if adapter is None else adapter.weights.get((layer, module))
        outs.append(torch.zeros(out) if pair is None else (x.double() @ pair[0].double().t()) @ pair[1].double().t())
    return torch.cat(outs).float()


PATTERNS = {
    "all-distinct": lambda n: [i % 4 for i in range(n)],
    "uniform": lambda n: [(i // 2) % 4 for i in range(n)],
    "skewed": lambda n: [0 if i % 5 else 1 + i % 3 for i in range(n)],
    "all-identical": lambda n: [2] * n,
    "with-base-rows": lambda n: [(i % 5) - 1 for i in range(n)],
    "all-base": lambda n: [-1] * n,
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("batch", [1, 3, 8, 17])
@pytest.mark.parametrize("dtype,tol,path", [(torch.float32, 1e-4, "torch"), (torch.bfloat16, 3e-2, "torch"),
                                            (torch.bfloat16, 3e-2, "native")])
def test_decode_rows_against_loop(pattern, batch, dtype, tol, path):
    slots = LoraSlots(CONFIG, num_slots=6, dtype=dtype)
    # Adapters in scattered slots; slot indices differ from adapter indices on purpose.
    placement = {0: 5, 1: 0, 2: 3, 3: 1}
    for a, s in placement.items():
        slots.load(s, ADAPTERS[a])
    adapters = PATTERNS[pattern](batch)
    row_slots = [placement[a] if a >= 0 else -1 for a in adapters]
    hook = LoraBatch(slots, row_slots, tokens_per_row=1, kernel=path == "native")
    assert (hook.kernel is not None) == (path == "native"), "the native BGMV kernel did not build"
    gen = torch.Generator().manual_seed(batch)
    for layer in range(CONFIG.num_layers):
        for projection, modules in PROJECTIONS.items():
            inp = module_shapes(CONFIG)[modules[0]][1]
            x = torch.randn(batch, 1, inp, generator=gen)
            base = torch.randn(batch, 1, sum(module_shapes(CONFIG)[m][0] for m in modules), generator=gen)
            got = hook.apply(layer, projection, x.to(dtype), base.clone().to(dtype)).float()
            for n, a in enumerate(adapters):
                want = base[n, 0] + reference_delta(x[n, 0], layer, projection, ADAPTERS[a] if a >= 0 else None)
                scale = want.abs().max().item() + 1
                assert (got[n, 0] - want).abs().max().item() <= tol * scale, (pattern, batch, layer, projection, n)


@pytest.mark.parametrize("held,activations,tol", [(torch.float32, torch.float32, 1e-4),
                                                  (torch.bfloat16, torch.float32, 1e-4),
                                                  (torch.bfloat16, torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rows", [[2], [0, 2, 2, -1], [-1, -1]])
def test_prefill_segments_against_loop(rows, held, activations, tol):
    """Several sequences of 5 tokens each, one adapter per sequence (SGMV segments), reading the adapters'
    own tensors: held in float32, or in bfloat16 as a bf16 engine holds them; computed in the activations'
    dtype (bf16 as served: a bf16 result, so bf16's tolerance; the loop multiplies the same held values)."""
    adapters = ADAPTERS if held == torch.float32 else [
        random_adapter(0, 4, dtype=held), random_adapter(1, 8, ("q_proj", "v_proj", "down_proj"), held),
        random_adapter(2, 16, dtype=held), random_adapter(3, 2, ("o_proj", "gate_proj"), held)]
    slots = LoraSlots(CONFIG, num_slots=4, dtype=torch.float32, rank=0)
    for s in range(4):
        slots.load(s, adapters[s])
    assert all(slots.single[s][1]["qkv"] is None or slots.single[s][1]["qkv"][0].data_ptr()
               == adapters[s].stacked[(1, "qkv")].data_ptr() for s in range(4))  # read in place, not copied
    hook = LoraBatch(slots, rows, tokens_per_row=5)
    assert hook.segments is not None
    gen = torch.Generator().manual_seed(9)
    for projection, modules in PROJECTIONS.items():
        inp = module_shapes(CONFIG)[modules[0]][1]
        x = torch.randn(len(rows), 5, inp, generator=gen).to(activations)
        base = torch.randn(len(rows), 5, sum(module_shapes(CONFIG)[m][0] for m in modules), generator=gen).to(
            activations)  # the base layer's output: the delta is added to it
        got = hook.apply(1, projection, x, base.clone()).float() - base.float()
        for b, s in enumerate(rows):
            for t in range(5):
                want = reference_delta(x[b, t].float(), 1, projection, adapters[s] if s >= 0 else None)
                assert torch.allclose(got[b, t], want, atol=tol * (want.abs().max().item() + 1))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2)])
def test_slots_grow_rank_and_keep_loaded_adapters(dtype, tol):
    """Growing the stacks (where slots are stacks: CUDA, float32, no compiler) keeps what they hold."""
    slots = LoraSlots(CONFIG, num_slots=3, dtype=dtype, rank=2, stacked=True)
    slots.load(0, ADAPTERS[3])  # rank 2
    slots.load(2, ADAPTERS[2])  # rank 16: stacks grow, slot 0 must survive
    assert slots.rank == 16
    hook = LoraBatch(slots, [0, 2], tokens_per_row=1)
    x = torch.randn(2, 1, CONFIG.hidden_size).to(dtype)
    got = hook.apply(0, "gate_up", x, torch.zeros(2, 1, 2 * CONFIG.intermediate_size, dtype=dtype)).float()
    for row, adapter in ((0, ADAPTERS[3]), (1, ADAPTERS[2])):
        want = reference_delta(x[row, 0].float(), 0, "gate_up", adapter)
        assert torch.allclose(got[row, 0], want, atol=tol * (want.abs().max().item() + 1))
    slots.clear(2)
    got = LoraBatch(slots, [2], tokens_per_row=1).apply(0, "gate_up", x[1:], torch.zeros(1, 1, 192, dtype=dtype))
    assert torch.count_nonzero(got) == 0
