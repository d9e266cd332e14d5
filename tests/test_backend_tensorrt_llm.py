"""The TensorRT-LLM backend's parts that run without TensorRT-LLM or a GPU (see its module docstring):
adapter ids, sampling and LoRA settings, adapter snapshots, choice scoring, output -> events, and the
engine's request flow against a fake `LLM` shaped like TensorRT-LLM's documented API."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HfTokenizer

from sidecar.backends import tensorrt_llm as trt
from sidecar.backends.tensorrt_llm import (
    LoraIds,
    TensorRtLlmEngine,
    continuation_logprobs,
    lora_config_kwargs,
    read_model_folder,
    sampling_kwargs,
    stream_events,
    write_peft_snapshot,
)
from sidecar.config import EngineConfig
from sidecar.engine.adapters import read_adapter
from sidecar.engine.api import AdapterError, AdapterRef, EngineStats, QueueFull, SamplingParams
from sidecar.engine.tokenizer import bytes_to_unicode
from sidecar.errors import UserError
from sidecar.model.lora import load_peft_adapter
from sidecar.model.random_adapter import write_random_adapter
from tests.test_output import builder


def ref(name="smith", version="v1", scale=1.0, path="/adapters/smith", loaded=None) -> AdapterRef:
    return AdapterRef(name, Path(path), version, scale, loaded=loaded)


# --- LoraIds ----------------------------------------------------------------------------------


def test_lora_ids_new_id_for_every_version_and_scale_same_id_otherwise():
    ids = LoraIds(max_entries=8)
    assert ids.request_args(None) is None
    first = ids.request_args(ref())
    assert first == ("smith@v1", 1, "/adapters/smith")
    assert ids.request_args(ref())[1] == 1  # same version: TensorRT-LLM's cached copy is still right
    assert ids.request_args(ref(version="v2"))[1] == 2  # changed weights: never the old id
    assert ids.request_args(ref(scale=0.5)) == ("smith@v1x0.5", 3, "/adapters/smith")
    assert ids.request_args(ref(name="bard"))[1] == 4
    assert ids.request_args(ref())[1] == 1
    assert ids.resident() == ["smith@v2", "smith@v1x0.5", "bard@v1", "smith@v1"]  # least recently used first


def test_lora_ids_are_bounded_never_reused_and_pinned_ones_stay():
    forgotten = []
    ids = LoraIds(max_entries=2, on_forget=forgotten.append)
    a, b, c = (ids.id_for(ref(version=v).key) for v in ("a", "b", "c"))
    assert (a, b, c) == (1, 2, 3) and len(ids) == 2 and forgotten == [1]
    assert ids.id_for(ref(version="a").key) == 4  # forgotten, then back: a fresh id, never 1 again
    assert forgotten == [1, 2]

    ids.pin(3)  # a request in flight uses "c": the others go first
    assert [ids.id_for(ref(version=v).key) for v in ("d", "e")] == [5, 6]
    assert forgotten == [1, 2, 4, 5] and len(ids) == 2
    ids.pin(6)
    assert ids.id_for(ref(version="f").key) == 7
    assert forgotten == [1, 2, 4, 5] and len(ids) == 3  # over the bound while both older ones are pinned
    ids.unpin(3)
    assert forgotten[-1] == 3 and len(ids) == 2
    ids.unpin(6)
    assert ids.resident() == ["smith@e", "smith@f"]
    with pytest.raises(ValueError):
        LoraIds(max_entries=0)


# --- settings ---------------------------------------------------------------------------------


def test_sampling_kwargs_exact():
    eos = (2, 7)
    assert sampling_kwargs(SamplingParams(max_tokens=40), 40, eos) == {
        "max_tokens": 40, "end_id": 2, "detokenize": False, "stop_token_ids": [7], "top_k": 1}
    assert sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.9, top_k=0, seed=5, stop=("\n",)), 12, (2,)) == {
        "max_tokens": 12, "end_id": 2, "detokenize": False, "temperature": 0.7, "top_p": 0.9, "top_k": 0,
        "seed": 5}
    assert sampling_kwargs(SamplingParams(temperature=0.7, min_p=0.2, seed=5), 12, (2,))["min_p"] == 0.2
    assert "min_p" not in sampling_kwargs(SamplingParams(min_p=0.2), 12, (2,))  # greedy: nothing to filter
    # No seed: a fresh one per request (TensorRT-LLM's default, 0, would repeat the same "random" reply).
    drawn = sampling_kwargs(SamplingParams(temperature=1.0, top_k=40), 8, (2,), rng=random.Random(3))
    assert drawn["seed"] == random.Random(3).getrandbits(63) and drawn["top_k"] == 40 and drawn["top_p"] == 1.0
    assert sampling_kwargs(SamplingParams(temperature=1.0), 8, (2,))["seed"] != sampling_kwargs(
        SamplingParams(temperature=1.0), 8, (2,))["seed"]
    assert sampling_kwargs(SamplingParams(ignore_eos=True, repetition_penalty=1.3), 64, eos) == {
        "max_tokens": 64, "end_id": 2, "detokenize": False, "ignore_eos": True, "top_k": 1,
        "repetition_penalty": 1.3}
    assert sampling_kwargs(SamplingParams(), 5, ())["end_id"] == -1


def test_lora_config_kwargs_lists_every_module_and_no_dir():
    kwargs = lora_config_kwargs(max_rank=32, max_loras=4, max_cpu_loras=16)
    assert kwargs == {
        "lora_dir": [],
        "lora_target_modules": ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_gate", "mlp_4h_to_h"],
        "trtllm_modules_to_hf_modules": {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
                                         "attn_dense": "o_proj", "mlp_h_to_4h": "gate_proj", "mlp_gate": "up_proj",
                                         "mlp_4h_to_h": "down_proj"},
        "max_lora_rank": 32, "max_loras": 4, "max_cpu_loras": 16}
    with pytest.raises(UserError, match="max_cpu_loras"):
        lora_config_kwargs(32, 8, 4)
    with pytest.raises(UserError):
        lora_config_kwargs(0, 1, 1)


# --- a tiny model folder (config + tokenizer only: the backend never reads the weights) -------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tokens = ["<|endoftext|>", "<s>", "</s>", *bytes_to_unicode().values()]
    tok = HfTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens[:3]])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": len(tokens), "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
        "eos_token_id": 2}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return folder


def test_read_model_folder(model_folder, tmp_path):
    tokenizer, config = read_model_folder(model_folder)
    assert tokenizer.eos_ids == (2, 0)  # generation_config.json wins, as in load_hf_folder
    assert config.vocab_size == 259 and config.max_position == 64 and config.kv_size == 8
    ids = tokenizer.encode_literal("Hi </s>")
    assert 2 not in ids and tokenizer.decode(ids) == "Hi </s>"  # player text stays literal
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="Hugging Face model folder"):
        read_model_folder(tmp_path / "m.gguf")


def test_clear_errors_without_the_package_or_a_gpu(monkeypatch, model_folder):
    if trt._package_installed():
        pytest.skip("tensorrt_llm is installed here")
    with pytest.raises(UserError) as e:
        TensorRtLlmEngine(model_folder)
    assert str(e.value) == trt.NOT_INSTALLED and "pip install 'npc-sidecar[tensorrt]'" in str(e.value)
    monkeypatch.setattr(trt, "_package_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU"):
        TensorRtLlmEngine(model_folder)


# --- adapter snapshots ------------------------------------------------------------------------


def test_snapshot_means_the_same_adapter_in_plain_peft_form(tmp_path, model_folder):
    _, config = read_model_folder(model_folder)
    folder = write_random_adapter(tmp_path / "npc", config, seed=1, rank=4, alpha=8.0,
                                  targets=("q_proj", "v_proj", "down_proj"))
    # Give down_proj its own rank and alpha, and use rsLoRA: what TensorRT-LLM's reader cannot express.
    tensors = load_file(folder / "adapter_model.safetensors")
    for key in [k for k in tensors if "down_proj.lora_A" in k]:
        tensors[key] = tensors[key][:2].contiguous()
    for key in [k for k in tensors if "down_proj.lora_B" in k]:
        tensors[key] = tensors[key][:, :2].contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3.0}, use_rslora=True)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    original = load_peft_adapter(folder, config, scale=0.5)

    snap = write_peft_snapshot(original, tmp_path / "snap" / "7")
    written = json.loads((snap / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (4, 4, False)
    assert "rank_pattern" not in written and sorted(written["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    raw = load_file(snap / "adapter_model.safetensors")
    assert raw["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 32)  # zero-padded
    assert raw["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (16, 4)
    assert not (snap.parent / "7.partial").exists()

    again = load_peft_adapter(snap, config)  # alpha / r = 1: the snapshot's B is used as written
    assert again.weights.keys() == original.weights.keys()
    for key, (a, b) in original.weights.items():
        a2, b2 = again.weights[key]
        assert torch.allclose(b2 @ a2, b @ a, atol=1e-7), key  # the same delta, scale included


# --- choices ----------------------------------------------------------------------------------


def test_continuation_logprobs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5 + 3 - 1, 11, generator=gen)  # input: a prompt of 5 + the candidate's first 2 tokens
    logp = torch.log_softmax(logits, -1)
    expected = [float(logp[4, 7]), float(logp[5, 1]), float(logp[6, 9])]  # row i predicts input token i + 1
    assert continuation_logprobs(logits, [7, 1, 9]) == pytest.approx(expected, abs=1e-5)
    assert continuation_logprobs(logits[None], [7, 1, 9]) == pytest.approx(expected, abs=1e-5)
    # KV-cache block reuse: no rows for a reused prefix; the last rows are the same ones.
    assert continuation_logprobs(logits[4:], [7, 1, 9]) == pytest.approx(expected, abs=1e-5)
    assert continuation_logprobs(logits[:5], [3]) == pytest.approx([float(logp[4, 3])], abs=1e-6)
    with pytest.raises(ValueError, match="last 3 rows"):
        continuation_logprobs(logits[5:], [7, 1, 9])


# --- outputs -> events (RequestOutput itself: tests/test_output.py) --------------------------


def snapshots(*steps):
    """Outputs as TensorRT-LLM streams them: one object, its token_ids extended in place each step."""
    completion = SimpleNamespace(token_ids=[], finish_reason=None)
    output = SimpleNamespace(outputs=[completion])

    async def gen():
        for new, reason in steps:
            completion.token_ids.extend(new)
            completion.finish_reason = reason
            yield output
    return gen()


def test_stream_events_from_output_objects():
    async def collect(outputs, ev):
        return [e async for e in stream_events(outputs, ev)]

    out = asyncio.run(collect(snapshots(([1], None), ([4, 7], None), ([], "length")), builder()))
    assert [(e.kind, e.text) for e in out] == [("delta", "Hi"), ("delta", " on"), ("delta", "!"),
                                               ("finished", "Hi on!")]
    assert out[-1].finish_reason == "length"
    cut = asyncio.run(collect(snapshots(([1], None)), builder()))  # ended with no final output
    assert [(e.kind, e.finish_reason) for e in cut] == [("delta", None), ("finished", "cancelled")]


# --- the engine against a fake LLM ------------------------------------------------------------


class FakeResult:
    """What LLM.generate_async returns, as far as the engine uses it: `async for` outputs, `finished`,
    `abort()`, `aresult()`, `context_logits`. Without a finish reason it runs until aborted."""

    def __init__(self, steps=(), context_logits=None):
        self.steps = list(steps)
        self.completion = SimpleNamespace(token_ids=[], finish_reason=None)
        self.outputs = [self.completion]
        self.context_logits = context_logits
        self.finished = False
        self.aborted = False
        self._abort = asyncio.Event()

    def abort(self):
        self.aborted = True
        self._abort.set()

    async def _stream(self):
        for new, reason in self.steps:
            await asyncio.sleep(0)
            self.completion.token_ids.extend(new)
            self.completion.finish_reason = reason
            self.finished = reason is not None
            yield self
            if self.finished:
                return
        await self._abort.wait()
        self.completion.finish_reason, self.finished = "cancelled", True
        yield self

    def __aiter__(self):
        return self._stream()

    async def aresult(self):
        await asyncio.sleep(0)
        self.finished = True
        return self


class FakeLLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        self.script = lambda inputs, params: FakeResult()
        self.shut_down = False

    def generate_async(self, inputs, sampling_params=None, lora_request=None, streaming=False):
        result = self.script(inputs, sampling_params)
        self.calls.append(SimpleNamespace(inputs=list(inputs), params=sampling_params, lora=lora_request,
                                          streaming=streaming, result=result))
        return result

    def shutdown(self):
        self.shut_down = True


API = SimpleNamespace(LLM=FakeLLM, SamplingParams=dict, LoraConfig=dict,
                      LoRARequest=lambda name, lora_id, path: SimpleNamespace(name=name, id=lora_id, path=path))


ENGINE_CONFIG = EngineConfig(max_batch=2, max_waiting=1, max_seq_len=48, max_rank=8)


def engine_run(model_folder, body):
    async def main():
        engine = TensorRtLlmEngine(model_folder, ENGINE_CONFIG, api=API)
        try:
            return await body(engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


def text_ids(engine, text):
    return engine.model.tokenizer.encode_literal(text)


def test_engine_streams_a_reply_and_passes_token_ids(model_folder):
    async def body(engine):
        llm = engine.llm
        assert llm.kwargs["skip_tokenizer_init"] is True and llm.kwargs["max_seq_len"] == 48
        assert llm.kwargs["max_batch_size"] == 2 and llm.kwargs["lora_config"]["max_loras"] == 8
        reply = text_ids(engine, "Well met")
        llm.script = lambda inputs, params: FakeResult([(reply[:3], None), (reply[3:] + [2], "stop")])
        prompt = text_ids(engine, "Hello")
        stream = engine.submit(prompt, None, SamplingParams(max_tokens=20), request_id="a")
        events = [e async for e in stream]
        call = llm.calls[0]
        assert call.inputs == prompt and call.streaming and call.lora is None
        assert call.params == {"max_tokens": 20, "end_id": 2, "detokenize": False, "stop_token_ids": [0], "top_k": 1}
        assert [e.kind for e in events] == ["started"] + ["delta"] * len(reply) + ["finished"]  # a delta per token
        assert "".join(e.text for e in events if e.kind == "delta") == "Well met" == events[-1].text
        assert events[-1].finish_reason == "stop" and events[-1].token_ids == tuple(reply)
        await asyncio.sleep(0)
        assert not call.result.aborted and engine.stats() == EngineStats(0, 0, ())
        # max_tokens is clamped to the room left in max_seq_len
        long = engine.submit(list(range(3, 43)), None, SamplingParams(max_tokens=20))
        await asyncio.sleep(0.01)
        assert llm.calls[1].params["max_tokens"] == 8
        long.cancel()
    engine_run(model_folder, body)


def test_engine_stop_string_and_cancel_abort_the_tensorrt_request(model_folder):
    async def body(engine):
        llm = engine.llm
        llm.script = lambda inputs, params: FakeResult([(text_ids(engine, "Go.\nPlayer: x"), None)])  # runs on
        stream = engine.submit([5, 6], None, SamplingParams(stop=("\nPlayer",)))
        events = [e async for e in stream]
        assert (events[-1].finish_reason, events[-1].text) == ("stop", "Go.")
        await asyncio.sleep(0)
        assert llm.calls[0].result.aborted  # the GPU stops decoding a reply nobody will read

        llm.script = lambda inputs, params: FakeResult([(text_ids(engine, "Once"), None)])
        stream = engine.submit([5, 6], None, SamplingParams())
        seen = []
        async for event in stream:
            seen.append(event)
            if event.kind == "delta":
                assert engine.cancel(stream.request_id)
        assert [e.kind for e in seen] == ["started", "delta", "delta", "delta", "delta", "finished"]
        assert (seen[-1].finish_reason, seen[-1].text) == ("cancelled", "Once")  # what was streamed
        assert llm.calls[1].result.aborted and not engine.cancel(stream.request_id)

        # A consumer that walks away (a gRPC client gone) cancels too; so does a cancel before it ran.
        stream = engine.submit([5, 6], None, SamplingParams())
        events = aiter(stream)
        while (await anext(events)).kind != "delta":
            pass
        await events.aclose()
        await asyncio.sleep(0.01)
        assert llm.calls[2].result.aborted and engine.stats().active_sequences == 0
        early = engine.submit([5, 6], None, SamplingParams())
        early.cancel()
        assert [(e.kind, e.finish_reason) async for e in early] == [("finished", "cancelled")]
    engine_run(model_folder, body)


def test_engine_adapters_get_snapshots_and_a_new_id_per_version(model_folder, tmp_path):
    async def body(engine):
        llm = engine.llm
        llm.script = lambda inputs, params: FakeResult([([2], "stop")])
        config = engine.model.shape
        folder = write_random_adapter(tmp_path / "smith", config, seed=0, rank=4, targets=("q_proj", "v_proj"))
        v1 = engine.load_adapter("smith", folder, "v1", scale=0.5)
        assert v1 == read_adapter(config, ENGINE_CONFIG.max_rank, "smith", folder, "v1", 0.5)
        for r in (v1, v1, engine.load_adapter("smith", folder, "v2")):
            assert [e.kind async for e in engine.submit([5], r, SamplingParams())] == ["started", "finished"]
        loras = [c.lora for c in llm.calls]
        assert [(lo.name, lo.id) for lo in loras] == [("smith@v1x0.5", 1), ("smith@v1x0.5", 1), ("smith@v2", 2)]
        snap = load_peft_adapter(Path(loras[0].path), config)  # what TensorRT-LLM reads: the validated weights
        a, b = snap.weights[(1, "v_proj")]
        a1, b1 = v1.loaded.weights[(1, "v_proj")]
        assert torch.allclose(b @ a, b1 @ a1, atol=1e-7)
        assert Path(loras[2].path) != Path(loras[0].path) and Path(loras[2].path).is_dir()
        assert engine.stats().resident_adapters == ("smith@v1x0.5", "smith@v2")

        with pytest.raises(AdapterError, match="no such folder"):  # validated before any request names it
            engine.load_adapter("ghost", tmp_path / "missing", "v1")
        assert len(llm.calls) == 3
        root = engine.snapshots.root
        return root
    root = engine_run(model_folder, body)
    assert not root.exists()  # shutdown removes the snapshots


def test_engine_scores_choices_from_context_logits(model_folder):
    vocab = 259
    table = torch.zeros(64, vocab)
    table[:, 10] = 3.0  # every position strongly predicts token 10

    async def body(engine):
        llm = engine.llm
        llm.script = lambda inputs, params: FakeResult(context_logits=table[:len(inputs)].clone())
        prompt = [5, 6, 7]
        stream = engine.submit(prompt, None, SamplingParams(max_tokens=1), choices=[[11, 10], [10], [10, 10]])
        events = [e async for e in stream]
        assert [e.kind for e in events] == ["started", "finished"]
        fin = events[-1]
        assert fin.finish_reason == "choice" and fin.choice == 1 and len(fin.choice_logprobs) == 3
        assert [c.inputs for c in llm.calls] == [prompt + [11], prompt, prompt + [10]]
        assert llm.calls[0].params == {"max_tokens": 1, "end_id": 2, "detokenize": False, "top_k": 1,
                                       "return_context_logits": True}
        logp = torch.log_softmax(table[0], -1)
        assert fin.choice_logprobs == pytest.approx((float(logp[11] + logp[10]), float(logp[10]), float(2 * logp[10])))
        assert fin.choice_token_logprobs[0] == pytest.approx((float(logp[11]), float(logp[10])))

        llm.script = lambda inputs, params: FakeResult(context_logits=table[:1])  # too few rows: an error, not a guess
        events = [e async for e in engine.submit(prompt, None, SamplingParams(), choices=[[10, 10]])]
        assert [(e.kind, e.internal) for e in events] == [("started", False), ("error", True)]
        assert "last 2 rows" in events[-1].error
    engine_run(model_folder, body)


def test_engine_refuses_bad_input_and_a_full_queue(model_folder):
    async def body(engine):
        for prompt, message in (([], "empty"), (list(range(3, 51)), "limit is 47"), ([3, 900], "vocabulary")):
            with pytest.raises(UserError, match=message):
                engine.submit(prompt, None, SamplingParams())
        with pytest.raises(UserError, match="non-empty"):
            engine.submit([3], None, SamplingParams(), choices=[[]])
        streams = [engine.submit([5], None, SamplingParams()) for _ in range(3)]  # 2 running + 1 waiting
        assert engine.stats().active_sequences == 2 and engine.stats().waiting_requests == 1
        with pytest.raises(QueueFull):
            engine.submit([5], None, SamplingParams())
        engine.llm.script = lambda inputs, params: FakeResult(context_logits=torch.zeros(len(inputs), 259))
        choice = engine.submit([5], None, SamplingParams(), choices=[[7]])  # scoring is never refused
        assert (await anext(aiter(choice))).kind == "started"

        def broken(inputs, params):
            raise RuntimeError("executor is gone")
        engine.llm.script = broken
        for s in streams:
            s.cancel()
        await asyncio.sleep(0.01)
        events = [e async for e in engine.submit([5], None, SamplingParams())]
        assert [(e.kind, e.internal) for e in events] == [("error", True)] and "executor is gone" in events[0].error
        return streams
    engine_run(model_folder, body)


def test_shutdown_cancels_live_requests_and_stops_the_llm(model_folder):
    async def body(engine):
        stream = engine.submit([5], None, SamplingParams())
        await asyncio.sleep(0.01)
        await engine.shutdown()
        assert [(e.kind, e.finish_reason) async for e in stream] == [("started", None), ("finished", "cancelled")]
        assert engine.llm.shut_down and engine.llm.calls[0].result.aborted
        with pytest.raises(QueueFull, match="shutting down"):
            engine.submit([5], None, SamplingParams())
    engine_run(model_folder, body)


def test_engine_counts_only_replies_toward_the_queue_limit(model_folder):
    """The rule every backend shares (engine/admission.py): a scoring request is never refused and never
    takes a reply's place; queue_full() says what the next reply's submit() would meet."""
    async def body(engine):
        engine.llm.script = lambda inputs, params: FakeResult(context_logits=torch.zeros(len(inputs), 259))
        replies = [engine.submit([5], None, SamplingParams()) for _ in range(2)]  # max_batch 2: both run
        scoring = engine.submit([5], None, SamplingParams(), choices=[[7]])
        replies.append(engine.submit([5], None, SamplingParams()))  # waits (the scoring one takes no place)
        assert engine.queue_full() and engine.stats().waiting_requests == 1
        with pytest.raises(QueueFull, match="1 requests are already waiting"):
            engine.submit([5], None, SamplingParams())
        assert [e.kind async for e in scoring] == ["started", "finished"]
        for stream in replies:
            stream.cancel()
        await asyncio.sleep(0.01)
        assert not engine.queue_full()
    engine_run(model_folder, body)
