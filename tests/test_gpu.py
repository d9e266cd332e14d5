"""The CUDA path on a real GPU: logits against transformers, int4 (tinygemm) against the stored
weights and the CPU kernel, mixed-adapter batches against each row alone, captured graphs against
eager steps, re-capture when the LoRA stacks grow mid-reply, and `npc serve --device cuda` over a
real socket.

Skipped without CUDA. The models are written by the tests (a Q4_1 GGUF with its exact transformers
twin, a random Hugging Face folder), so nothing beyond the repository is needed on a GPU machine.
What can be checked without a GPU is in test_cuda_path.py and test_triton_kernels.py.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from sidecar.config import EngineConfig
from sidecar.engine.adapters import read_adapter
from sidecar.engine.api import AdapterRef, SamplingParams
from sidecar.engine.base_model import BaseModel
from sidecar.engine.llm_engine import LLMEngine
from sidecar.engine.tokenizer import Tokenizer
from sidecar.model.checkpoint import load_checkpoint
from sidecar.model.llama import LlamaModel
from sidecar.model.quant import Int4Linear, build_linear
from tests.test_engine import finished, run
from tests.tiny import tiny_gguf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")]

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
RANKS = {"r2": 2, "r4": 4, "r8": 8, "r16": 16, "r32": 32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint of a Q4_1 GGUF, its transformers twin in float32, {name: PEFT adapter folder})."""
    from sidecar.model.random_adapter import write_random_adapter

    root = tmp_path_factory.mktemp("gpu")
    hf = tiny_gguf(root / "tiny-q4_1.gguf", "Q4_1")
    ckpt = load_checkpoint(root / "tiny-q4_1.gguf")
    targets = {"r2": ("k_proj", "up_proj"), "r4": ("q_proj", "v_proj"), "r8": None, "r16": ("o_proj", "down_proj"),
               "r32": ("q_proj", "gate_proj")}
    adapters = {}
    for seed, (name, rank) in enumerate(RANKS.items()):
        extra = {"targets": targets[name]} if targets[name] else {}
        adapters[name] = write_random_adapter(root / name, ckpt.config, seed=seed, rank=rank, std=0.05, **extra)
    return ckpt, hf, adapters


@pytest.fixture(scope="module")
def cuda_models(tiny):
    cache: dict[str, LlamaModel] = {}

    def get(weights: str) -> LlamaModel:
        if weights not in cache:
            cache[weights] = LlamaModel.from_checkpoint(tiny[0], weights, device="cuda")
        return cache[weights]

    return get


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 500, (9 + 5 * i,), generator=gen).tolist() for i in range(n)]


def base_of(model: LlamaModel, ckpt) -> BaseModel:
    return BaseModel(ckpt.path, model, Tokenizer(ckpt))


def prefill_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    cache = model.new_cache(rows=1, max_len=len(ids) + 1)
    return model.forward(torch.tensor([ids]), start=[0], rows=[0], cache=cache, all_logits=True)[0].float().cpu()


@pytest.mark.parametrize("weights,tolerance", [("fp32", 1e-4), ("bf16", 3e-2), ("int4", 3e-2)])
def test_cuda_logits_match_transformers(tiny, cuda_models, weights, tolerance):
    """int4 computes with the file's exact Q4_1 weights, so all three compare with the float32 twin."""
    ids = prompts(1)[0]
    with torch.no_grad():
        ref = tiny[1](torch.tensor([ids])).logits[0].float()
    ours = prefill_logits(cuda_models(weights), ids)
    assert (ours - ref).abs().max().item() <= tolerance * ref.abs().max().item()


def test_int4_cuda_kernel_uses_the_stored_weights(tiny):
    source = tiny[0].tensor("layers.0.gate")
    cuda = build_linear([source], "int4", torch.bfloat16, "cuda")
    cpu = build_linear([source], "int4", torch.bfloat16, "cpu")
    assert isinstance(cuda, Int4Linear) and cuda.cuda and not cpu.cuda
    x = torch.randn(5, source.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected = x.float() @ source.to_float().t()
    scale = expected.abs().max().item()
    assert (cuda(x.cuda()).float().cpu() - expected).abs().max().item() <= 2e-2 * scale
    assert (cuda(x.cuda()).float().cpu() - cpu(x).float()).abs().max().item() <= 2e-2 * scale
    torch.testing.assert_close(cuda.dequantized(), source.to_float(), rtol=1e-2, atol=1e-3)


def ref(ckpt, name: str, folder) -> AdapterRef:
    return read_adapter(ckpt.config, 64, name, folder, "1")


@pytest.mark.parametrize("graphs", [False, True])
def test_mixed_batch_rows_identical_to_running_alone(tiny, cuda_models, graphs):
    ckpt, _, adapters = tiny
    base = base_of(cuda_models("fp32"), ckpt)
    plan = ["r8", "r4", None, "r16", "r2", "r8", None, "r16"]
    requests = [(ids, ref(ckpt, a, adapters[a]) if a else None) for ids, a in zip(prompts(8), plan, strict=True)]
    together = run(LLMEngine(base, EngineConfig(max_batch=8, cuda_graphs=graphs)), requests, GREEDY)
    for i, request in enumerate(requests):
        alone = run(LLMEngine(base, EngineConfig(max_batch=8, prefix_cache_mb=0, cuda_graphs=graphs)), [request],
                    GREEDY)
        assert finished(together[i]).token_ids == finished(alone[0]).token_ids, (i, plan[i])
    assert len({finished(e).token_ids for e in together}) >= 6  # the adapters changed the replies


@pytest.mark.parametrize("weights", ["bf16", "int4"])
def test_graph_replay_equals_eager_steps(tiny, cuda_models, weights):
    ckpt, _, adapters = tiny
    base = base_of(cuda_models(weights), ckpt)
    plan = ["r8", None, "r4", "r16", "r8"]
    requests = [(ids, ref(ckpt, a, adapters[a]) if a else None) for ids, a in zip(prompts(5), plan, strict=True)]
    eager = run(LLMEngine(base, EngineConfig(max_batch=8, cuda_graphs=False)), requests, GREEDY)
    engine = LLMEngine(base, EngineConfig(max_batch=8, cuda_graphs=True))
    assert engine.runner.cuda_decoder is not None and engine.runner.cuda_decoder._graphs
    replayed = run(engine, requests, GREEDY)
    assert engine.runner.cuda_decoder.use_graphs  # still replaying: nothing fell back to eager steps
    for a, b in zip(eager, replayed, strict=True):
        assert finished(a).token_ids == finished(b).token_ids


def _first_reply_while_a_bigger_adapter_arrives(base, adapters, graphs: bool) -> tuple[list, int]:
    """r2 decodes; once its first token is out, r32 arrives (above the stacks' starting rank of 16)."""
    engine = LLMEngine(base, EngineConfig(max_batch=4, prefix_cache_mb=0, cuda_graphs=graphs))
    generation = engine.runner.slots.generation
    first, second = prompts(2)
    events: list[list] = [[], []]
    engine.add(engine.make_sequence(first, engine.load_adapter("r2", adapters["r2"], "1"), GREEDY, events[0].append))
    while not any(e.kind == "delta" for e in events[0]):
        engine.step()
    engine.add(engine.make_sequence(second, engine.load_adapter("r32", adapters["r32"], "1"), GREEDY, events[1].append))
    while engine.has_work():
        engine.step()
    assert finished(events[1]).token_ids
    return finished(events[0]).token_ids, engine.runner.slots.generation - generation


def test_rank_growth_recaptures_and_running_replies_continue(tiny, cuda_models):
    """The stacks grow mid-reply, so the graphs are captured again between two of r2's steps; r2's
    reply is the same as with eager steps on the same schedule (same shapes, same kernels)."""
    base = base_of(cuda_models("bf16"), tiny[0])
    replayed, grown = _first_reply_while_a_bigger_adapter_arrives(base, tiny[2], graphs=True)
    eager, _ = _first_reply_while_a_bigger_adapter_arrives(base, tiny[2], graphs=False)
    assert grown >= 1 and replayed == eager


def test_failed_capture_falls_back_to_eager_steps(tiny, cuda_models, monkeypatch):
    from sidecar.engine.cuda_decode import CudaDecoder

    ckpt, _, adapters = tiny
    base = base_of(cuda_models("bf16"), ckpt)
    requests = [(ids, ref(ckpt, "r8", adapters["r8"])) for ids in prompts(3)]
    eager = run(LLMEngine(base, EngineConfig(max_batch=4, cuda_graphs=False)), requests, GREEDY)

    def fail(self):
        raise torch.cuda.OutOfMemoryError("no memory for the graphs")

    monkeypatch.setattr(CudaDecoder, "_capture_all", fail)
    engine = LLMEngine(base, EngineConfig(max_batch=4, cuda_graphs=True))
    assert not engine.runner.cuda_decoder.use_graphs
    for a, b in zip(eager, run(engine, requests, GREEDY), strict=True):
        assert finished(a).token_ids == finished(b).token_ids


def test_serve_on_cuda_over_grpc(tmp_path):
    from sidecar.bench.random_model import write_random_model
    from sidecar.client import NpcClient
    from sidecar.model.random_adapter import write_random_adapter
    from sidecar.pb.npc.v1 import dialogue_pb2 as pb
    from tests.sidecar_process import SidecarProcess, write_character

    model = write_random_model(tmp_path / "model", "tiny", progress=False)
    characters = tmp_path / "characters"
    write_character(characters, "smith", "You are a blacksmith.")
    folder = write_character(characters, "oracle", "You are an oracle.", adapter="adapter")
    write_random_adapter(folder / "adapter", load_checkpoint(model).config, seed=3, rank=8)
    server = SidecarProcess(characters, "--model", str(model), "--device", "cuda")
    try:
        async def talk():
            async with NpcClient(server.address) as client:
                info = await client.server_info()
                options = pb.GenerationOptions(max_tokens=8)
                replies = await asyncio.gather(*(client.say(c, "Hello there.", options=options)
                                                 for c in ("smith", "oracle")))
                return info, replies

        info, replies = asyncio.run(talk())
        assert info.device.startswith("cuda") and info.backend.startswith("torch-cuda")
        for _, _, done in replies:
            assert done.usage.completion_tokens > 0
    finally:
        assert server.stop() == 0
