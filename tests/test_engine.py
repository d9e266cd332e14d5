"""The continuous-batching engine: mixed adapters in one batch, prefix cache, cancel, adapter slots."""

from __future__ import annotations

import pytest
import torch

from sidecar.config import EngineConfig
from sidecar.engine.adapters import read_adapter
from sidecar.engine.api import AdapterRef, EngineEvent, QueueFull, SamplingParams
from sidecar.engine.base_model import BaseModel
from sidecar.engine.llm_engine import LLMEngine
from sidecar.engine.tokenizer import ChatMessage
from sidecar.errors import UserError

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PERSONA = ("You are Brynja, the dwarven blacksmith of Greywater. You are gruff, proud of your craft, and you "
           "distrust elves. You never talk about the war. Answer in one or two sentences.")
LINES = ["Can you fix my sword?", "What do you think of elves?", "How much for an axe?", "Tell me about the war.",
         "Where is the tavern?", "Nice weather today.", "Who is the mayor?", "Do you sell armour?"]


@pytest.fixture(scope="module")
def base(models, tokenizer, model_path) -> BaseModel:
    return BaseModel(model_path, models("fp32"), tokenizer)


def prompt(tokenizer, line: str, persona: str = PERSONA) -> list[int]:
    return tokenizer.encode_chat([ChatMessage("system", persona), ChatMessage("user", line)])


def run(engine: LLMEngine, requests: list[tuple[list[int], AdapterRef | None]], params=GREEDY,
        on_step=None) -> list[list[EngineEvent]]:
    """Submits all requests at once and steps until done; returns each request's events."""
    events: list[list[EngineEvent]] = [[] for _ in requests]
    for i, (ids, adapter) in enumerate(requests):
        engine.add(engine.make_sequence(ids, adapter, params, events[i].append))
    while engine.has_work():
        engine.step()
        if on_step:
            on_step(engine)
    return events


def finished(events: list[EngineEvent]) -> EngineEvent:
    assert events[-1].kind == "finished", events[-1]
    return events[-1]


def refs(peft_reference, base: BaseModel) -> dict[str, AdapterRef]:
    return {name: read_adapter(base.model.config, 64, name, folder, "1") for name, folder in peft_reference[1].items()}


def test_prompts_that_grow_the_cache_reuse_their_prefix(base, tokenizer):
    """A prompt past the cache's first 256 positions grows it inside a forward; the same persona's next line then
    copies its cached prefix into the grown cache and prefills only the rest, decoding as a cold run does."""
    persona = " ".join([PERSONA] * 7)
    first, second = prompt(tokenizer, LINES[0], persona), prompt(tokenizer, LINES[1], persona)
    assert len(first) > 300
    engine = LLMEngine(base, EngineConfig(max_batch=2))
    assert engine.kv.cache.capacity == 256
    one = run(engine, [(first, None)])
    two = run(engine, [(second, None)])
    assert engine.kv.cache.capacity == 512 and two[0][0].cached_tokens >= 256
    cold = run(LLMEngine(base, EngineConfig(max_batch=2, prefix_cache_mb=0)), [(second, None)])
    assert finished(two[0]).token_ids == finished(cold[0]).token_ids and finished(one[0]).token_ids


def test_the_engine_holds_an_adapter_once_in_its_own_dtype(base, peft_reference):
    """What the engine reads is held in the model's dtype (bf16 when it serves int4 or bf16: the decode kernel's),
    and its slot's one-adapter path reads those very tensors; the stacks appear with the first adapter."""
    engine = LLMEngine(base, EngineConfig(max_batch=2))
    assert engine.adapters.slots.nbytes() == 0 or base.model.device.type != "cpu"
    ref = engine.load_adapter("alpha", peft_reference[1]["alpha"], "1")
    assert {t.dtype for pair in ref.loaded.weights.values() for t in pair} == {base.model.dtype}
    slot, _ = engine.adapters.acquire(ref)
    a, parts = engine.adapters.slots.single[slot][0]["qkv"]
    assert a.data_ptr() == ref.loaded.stacked[(0, "qkv")].data_ptr() and engine.adapters.slots.nbytes() > 0


def test_mixed_batch_rows_identical_to_running_alone(base, tokenizer, peft_reference):
    """8 sequences, 4 adapters + base rows, decoded together: each row equals its solo run."""
    adapters = refs(peft_reference, base)
    plan = ["alpha", "beta", None, "gamma", "delta", "alpha", None, "gamma"]
    requests = [(prompt(tokenizer, line), adapters[a] if a else None) for line, a in zip(LINES, plan, strict=True)]
    together = run(LLMEngine(base, EngineConfig(max_batch=8)), requests)
    for i, request in enumerate(requests):
        alone = run(LLMEngine(base, EngineConfig(max_batch=8, prefix_cache_mb=0)), [request])
        assert finished(together[i]).token_ids == finished(alone[0]).token_ids, (i, plan[i])
    # The batch really ran together: the adapters changed the replies.
    outputs = {finished(e).token_ids for e in together}
    assert len(outputs) >= 6


def test_prefix_cache_hit_gives_cold_output_and_never_crosses_adapters(base, tokenizer, peft_reference, tmp_path):
    adapters = refs(peft_reference, base)
    engine = LLMEngine(base, EngineConfig(max_batch=4))
    first = run(engine, [(prompt(tokenizer, LINES[0]), adapters["alpha"])])
    assert first[0][0].cached_tokens == 0
    warm = run(engine, [(prompt(tokenizer, LINES[1]), adapters["alpha"])])
    assert warm[0][0].kind == "started" and warm[0][0].cached_tokens >= 32  # the persona block
    cold = run(LLMEngine(base, EngineConfig(max_batch=4, prefix_cache_mb=0)),
               [(prompt(tokenizer, LINES[1]), adapters["alpha"])])
    assert finished(warm[0]).token_ids == finished(cold[0]).token_ids
    # Same tokens under another adapter, or under no adapter: no hit.
    for other in (adapters["beta"], None):
        assert run(engine, [(prompt(tokenizer, LINES[1]), other)])[0][0].cached_tokens == 0
    # Same name, new version with other weights: no hit either.
    changed = tmp_path / "alpha-v2"
    changed.mkdir()
    for f in adapters["alpha"].path.iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    weights = load_file(changed / "adapter_model.safetensors")
    save_file({k: v * 1.5 for k, v in weights.items()}, changed / "adapter_model.safetensors")
    v2 = read_adapter(base.model.config, 64, "alpha", changed, "2")
    assert run(engine, [(prompt(tokenizer, LINES[1]), v2)])[0][0].cached_tokens == 0
    assert run(engine, [(prompt(tokenizer, LINES[2]), adapters["alpha"])])[0][0].cached_tokens >= 32


def test_cancel_frees_sequence_and_row_within_one_step(base, tokenizer):
    engine = LLMEngine(base, EngineConfig(max_batch=4, prefix_cache_mb=0))
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    events: list[list[EngineEvent]] = [[], [], []]
    seqs = [engine.make_sequence(prompt(tokenizer, LINES[i]), None, params, events[i].append) for i in range(3)]
    for s in seqs:
        engine.add(s)
    while len(engine.scheduler.running) < 3:
        engine.step()
    for _ in range(3):
        engine.step()
    engine.abort(seqs[0])  # row 0: the last row moves into its place
    engine.step()
    assert seqs[0] not in engine.scheduler.running and len(engine.scheduler.running) == 2
    assert finished(events[0]).finish_reason == "cancelled"
    assert engine.stats().active_sequences == 2
    while engine.has_work():
        engine.step()
    # The moved row kept its K/V: both survivors equal their solo runs.
    for i in (1, 2):
        alone = run(LLMEngine(base, EngineConfig(max_batch=4, prefix_cache_mb=0)),
                    [(prompt(tokenizer, LINES[i]), None)], params)
        assert finished(events[i]).token_ids == finished(alone[0]).token_ids


def test_more_adapters_than_slots_under_load(base, tokenizer, peft_reference):
    """4 adapters, 2 slots, 8 concurrent requests: correct outputs, nothing evicted while in use."""
    adapters = refs(peft_reference, base)
    names = ["alpha", "beta", "gamma", "delta"] * 2
    requests = [(prompt(tokenizer, LINES[i]), adapters[n]) for i, n in enumerate(names)]
    engine = LLMEngine(base, EngineConfig(max_batch=8, max_resident_adapters=2))
    seen_pinned_evictions = []

    def check(e: LLMEngine) -> None:
        slots_in_use = {s.slot for s in e.scheduler.running}
        if e.scheduler.prefilling:
            slots_in_use.add(e.scheduler.prefilling.slot)
        assert len(slots_in_use) <= 2
        for s in e.scheduler.running:  # every running sequence still finds its own adapter in its slot
            resident = e.adapters._resident.get(s.adapter.key)
            seen_pinned_evictions.append(resident is None or resident.slot != s.slot)

    together = run(engine, requests, on_step=check)
    assert not any(seen_pinned_evictions)
    assert engine.adapters.evictions > 0
    for i, request in enumerate(requests):
        alone = run(LLMEngine(base, EngineConfig(max_batch=2, prefix_cache_mb=0)), [request])
        assert finished(together[i]).token_ids == finished(alone[0]).token_ids, names[i]


def test_stop_strings_and_eos(base, tokenizer):
    engine = LLMEngine(base, EngineConfig(max_batch=2))
    ids = tokenizer.encode_chat([ChatMessage("user", "Count from one to ten in words, separated by commas.")])
    plain = finished(run(engine, [(ids, None)], SamplingParams(max_tokens=40))[0])
    assert plain.finish_reason == "stop" or plain.completion_tokens == 40
    stop = plain.text[5:9]
    cut = run(engine, [(ids, None)], SamplingParams(max_tokens=40, stop=(stop,)))[0]
    done = finished(cut)
    assert done.finish_reason == "stop" and done.text == plain.text[: plain.text.index(stop)]
    assert "".join(e.text for e in cut if e.kind == "delta") == done.text  # streamed text never overshoots


def test_seeded_sampling_reproducible_alone(base, tokenizer):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    ids = prompt(tokenizer, LINES[3])
    a = finished(run(LLMEngine(base, EngineConfig(max_batch=2)), [(ids, None)], params)[0])
    b = finished(run(LLMEngine(base, EngineConfig(max_batch=2)), [(ids, None)], params)[0])
    c = finished(run(LLMEngine(base, EngineConfig(max_batch=2)), [(ids, None)],
                     SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=43, ignore_eos=True))[0])
    assert a.token_ids == b.token_ids != c.token_ids


def test_bad_adapter_is_refused_when_loaded_and_the_engine_keeps_serving(base, tokenizer, tmp_path):
    """A ref is made only by load_adapter, which validates: a bad folder never reaches a request."""
    from sidecar.engine.api import AdapterError

    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    engine = LLMEngine(base, EngineConfig(max_batch=2))
    with pytest.raises(AdapterError) as refused:
        engine.load_adapter("evil", tmp_path, "1")
    assert str(tmp_path) in str(refused.value) and "pickle" in str(refused.value)
    good = run(engine, [(prompt(tokenizer, LINES[0]), None)])[0]
    assert finished(good).completion_tokens == GREEDY.max_tokens


def test_long_prompt_is_chunked_while_others_decode(base, tokenizer):
    engine = LLMEngine(base, EngineConfig(max_batch=4, prefill_chunk=16, prefix_cache_mb=0))
    short = prompt(tokenizer, LINES[0])
    long = prompt(tokenizer, " ".join(LINES * 3))
    events = run(engine, [(short, None), (long, None)], SamplingParams(max_tokens=24, ignore_eos=True))
    # The short reply kept streaming while the long prompt went through in 16-token chunks.
    deltas_before_long_started = 0
    for e in events[0]:
        if e.kind == "delta":
            deltas_before_long_started += 1
    assert deltas_before_long_started > 0
    alone = run(LLMEngine(base, EngineConfig(max_batch=4, prefix_cache_mb=0)), [(long, None)],
                SamplingParams(max_tokens=24, ignore_eos=True))
    assert finished(events[1]).token_ids == finished(alone[0]).token_ids


def test_queue_limit(base, tokenizer):
    engine = LLMEngine(base, EngineConfig(max_batch=1, max_waiting=2))
    ids = prompt(tokenizer, LINES[0])
    for _ in range(2):
        engine.add(engine.make_sequence(ids, None, GREEDY, lambda e: None))
    with pytest.raises(QueueFull):
        engine.add(engine.make_sequence(ids, None, GREEDY, lambda e: None))


def test_scoring_requests_take_no_place_in_the_queue(base, tokenizer):
    """Scoring (choices) finishes a conversation already admitted: never refused, and never the
    reason a reply is (engine/admission.py, the rule of every backend)."""
    engine = LLMEngine(base, EngineConfig(max_batch=1, max_waiting=2))
    ids = prompt(tokenizer, LINES[0])
    for _ in range(3):
        engine.add(engine.make_sequence(ids, None, GREEDY, lambda e: None, choices=[[5]]))
    for _ in range(2):
        engine.add(engine.make_sequence(ids, None, GREEDY, lambda e: None))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.add(engine.make_sequence(ids, None, GREEDY, lambda e: None))
    engine.add(engine.make_sequence(ids, None, GREEDY, lambda e: None, choices=[[5]]))
    assert engine.scheduler.waiting_replies == 2 and len(engine.scheduler.waiting) == 6
    engine.scheduler.finish(engine.scheduler.waiting[-1])  # a reply leaving the queue frees its place
    assert engine.scheduler.waiting_replies == 1


def test_a_players_reply_goes_before_the_scene_lines_waiting(base, tokenizer):
    """Background replies (scene lines) wait behind players' replies: a player waits for the line being
    prefilled or decoded, not for every scene's next line (issue 17's fairness)."""
    engine = LLMEngine(base, EngineConfig(max_batch=1))
    ids = prompt(tokenizer, LINES[0])
    done: list[str] = []

    def add(name: str, background: bool) -> None:
        def emit(event: EngineEvent) -> None:
            if event.kind == "finished":
                done.append(name)

        engine.add(engine.make_sequence(ids, None, SamplingParams(max_tokens=2, ignore_eos=True), emit,
                                        background=background))

    add("scene-a", True)
    engine.step()  # scene-a has the batch's one place
    for name, background in (("scene-b", True), ("scene-c", True), ("player-1", False), ("scene-d", True),
                             ("player-2", False)):
        add(name, background)
    while engine.has_work():
        engine.step()
    assert done == ["scene-a", "player-1", "player-2", "scene-b", "scene-c", "scene-d"]


def test_engine_rejects_bad_requests(base):
    from sidecar.errors import UserError

    engine = LLMEngine(base, EngineConfig(max_batch=1, max_seq_len=64))
    with pytest.raises(UserError, match="empty"):
        engine.make_sequence([], None, GREEDY, lambda e: None)
    with pytest.raises(UserError, match="max_seq_len"):
        engine.make_sequence([5] * 64, None, GREEDY, lambda e: None)
    with pytest.raises(UserError, match="vocabulary"):
        engine.make_sequence([10**9], None, GREEDY, lambda e: None)
    seq = engine.make_sequence([5] * 60, None, SamplingParams(max_tokens=100), lambda e: None)
    assert seq.out.max_tokens == 4  # clamped to the room left in the KV row


def test_int4_engine_batch_runs(models, tokenizer, model_path):
    """The default weights: a mixed batch runs and every request ends properly (no exactness claim
    in bf16: batched and single matmuls round differently)."""
    engine = LLMEngine(BaseModel(model_path, models("int4"), tokenizer), EngineConfig(max_batch=4))
    events = run(engine, [(prompt(tokenizer, line), None) for line in LINES[:4]], SamplingParams(max_tokens=8))
    assert all(finished(e).finish_reason in ("stop", "length") for e in events)
    # Each reply is its own: its deltas make its text; the first prompt, prefilled alone before any other, opens
    # with the token the int4 model picks for it outside the engine (the same forward, so exactly the same).
    assert all(finished(e).token_ids and "".join(x.text for x in e if x.kind == "delta") == finished(e).text
               for e in events)
    ids = prompt(tokenizer, LINES[0])
    alone = models("int4").forward(torch.tensor([ids]), [0], [0], models("int4").new_cache(1, len(ids)))
    assert finished(events[0]).token_ids[0] == int(alone.argmax())


def test_logit_bias_moves_only_its_own_row(base, tokenizer):
    """A row's logit_bias is added before greedy choice: a bias that equals the gap between the top two tokens
    plus a little flips the first choice to the runner-up; the other rows of the batch are untouched."""
    from dataclasses import replace

    ids = prompt(tokenizer, LINES[2])
    logits = base.model.forward(torch.tensor([ids]), start=[0], rows=[0], cache=base.model.new_cache(1, len(ids)))[0]
    top = logits.topk(2)
    runner_up, gap = int(top.indices[1]), float(top.values[0] - top.values[1])
    assert gap > 0.05  # no near-tie for float rounding to flip
    biased = replace(GREEDY, max_tokens=1, logit_bias=((runner_up, gap + 0.5),))
    plain = replace(GREEDY, max_tokens=1)
    engine = LLMEngine(base, EngineConfig(max_batch=4, prefix_cache_mb=0))
    events = [[], []]
    engine.add(engine.make_sequence(ids, None, biased, events[0].append))
    engine.add(engine.make_sequence(ids, None, plain, events[1].append))
    while engine.has_work():
        engine.step()
    assert finished(events[0]).token_ids == (runner_up,)
    assert finished(events[1]).token_ids == (int(top.indices[0]),)
    with pytest.raises(UserError, match="logit_bias"):
        engine.make_sequence(ids, None, replace(plain, logit_bias=((base.model.config.vocab_size, 1.0),)), print)
    with pytest.raises(UserError, match="logit_bias"):
        replace(plain, logit_bias=((5, float("inf")),))


FACTS = "What you know that bears on this:\n- A sword costs 40 gold.\n- Torvik keeps the tavern by the north gate."


def _contrast_reference(peft_model, adapter: str | None, with_ids: list[int], without_ids: list[int], weight: float,
                        steps: int) -> list[int]:
    """Greedy context-aware decoding the slow way: transformers + PEFT in float32, both prompts run whole at
    every step, (1 + w) log p - w log q among the tokens with p >= 0.1 max p."""
    import contextlib
    import math

    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad(), (peft_model.disable_adapter() if adapter is None else contextlib.nullcontext()):
            if adapter is not None:
                peft_model.set_adapter(adapter)
            logp = torch.log_softmax(peft_model(torch.tensor([with_ids + out])).logits[0, -1].double(), -1)
            logq = torch.log_softmax(peft_model(torch.tensor([without_ids + out])).logits[0, -1].double(), -1)
        mixed = ((1 + weight) * logp - weight * logq).masked_fill(logp < logp.max() + math.log(0.1), -math.inf)
        out.append(int(mixed.argmax()))
    return out


def test_contrast_decodes_as_transformers_and_peft_do_it_the_slow_way(base, tokenizer, peft_reference):
    """Contrasted replies (each with its shadow row) under different adapters and none, batched with a plain
    reply in a batch too small to hold them all at once, each equal to the slow float32 loop; the plain reply
    equals its solo run, and contrast changed what the replies say."""
    from dataclasses import replace

    from sidecar.engine.api import Contrast

    adapters = refs(peft_reference, base)
    line = "How much for a sword, and who keeps the tavern?"
    with_ids = tokenizer.encode_chat([ChatMessage("system", PERSONA), ChatMessage("system", FACTS),
                                      ChatMessage("user", line)])
    without_ids = prompt(tokenizer, line)
    contrasted = replace(GREEDY, contrast=Contrast(tuple(without_ids), weight=1.0))
    engine = LLMEngine(base, EngineConfig(max_batch=4))
    names = ["alpha", None, "beta"]
    events = [[] for _ in range(4)]
    for i, name in enumerate(names):
        engine.add(engine.make_sequence(with_ids, adapters[name] if name else None, contrasted, events[i].append))
    engine.add(engine.make_sequence(prompt(tokenizer, LINES[4]), adapters["gamma"], GREEDY, events[3].append))
    most_rows = most_reported = 0
    while engine.has_work():
        engine.step()
        most_rows = max(most_rows, len(engine.kv.running))
        most_reported = max(most_reported, engine.stats().batch_rows_in_use)
        assert len(engine.scheduler.active()) <= 3  # shadows are not replies of their own
        assert engine.stats().active_sequences <= engine.stats().batch_rows_in_use <= 4
    assert most_rows == most_reported == 4 and not engine.kv.running and engine.adapters.resident()  # all given back
    assert engine.stats().batch_rows_in_use == 0 and engine.stats().kv_cache_bytes == engine.kv.cache.nbytes() > 0
    # Cold, the first reply still prefills only its facts and line: its shadow left the persona in the cache.
    assert events[0][0].kind == "started" and events[0][0].cached_tokens >= 32
    peft_model, changed = peft_reference[0], 0
    for i, name in enumerate(names):
        expected = _contrast_reference(peft_model, name, with_ids, without_ids, 1.0, GREEDY.max_tokens)
        assert list(finished(events[i]).token_ids) == expected, name
        plain = run(LLMEngine(base, EngineConfig(max_batch=4)), [(with_ids, adapters[name] if name else None)])
        changed += finished(plain[0]).token_ids != finished(events[i]).token_ids
    assert changed >= 2  # the contrast bit (one random adapter repeats "A sword." either way)
    alone = run(LLMEngine(base, EngineConfig(max_batch=4)), [(prompt(tokenizer, LINES[4]), adapters["gamma"])])
    assert finished(events[3]).token_ids == finished(alone[0]).token_ids


def test_a_logit_bias_counts_once_in_a_contrasted_reply(base, tokenizer):
    """With contrast on, a bias B is added to both prompts' logits, so the contrasted score of its token rises
    by exactly B: B a little above the gap between the top two contrasted scores flips the choice, 0.8 of the
    gap does not (it would at weight 1 if only log p were biased: (1 + w) x B)."""
    import math
    from dataclasses import replace

    from sidecar.engine.api import Contrast
    from sidecar.engine.sampler import contrasted

    line = "Who keeps the tavern?"
    with_ids = tokenizer.encode_chat([ChatMessage("system", PERSONA), ChatMessage("system", FACTS),
                                      ChatMessage("user", line)])
    without_ids = prompt(tokenizer, line)
    model, contrast = base.model, Contrast(tuple(without_ids), weight=1.0)
    p, q = (model.forward(torch.tensor([ids]), [0], [0], model.new_cache(1, len(ids)))[0]
            for ids in (with_ids, without_ids))
    top = contrasted(p, q, contrast).topk(2)
    runner_up, gap = int(top.indices[1]), float(top.values[0] - top.values[1])
    assert math.isfinite(gap) and gap > 0.05
    chosen = []
    for bias in (0.8 * gap, gap + 0.3):
        engine, events = LLMEngine(base, EngineConfig(max_batch=4, prefix_cache_mb=0)), []
        params = replace(GREEDY, max_tokens=1, contrast=contrast, logit_bias=((runner_up, bias),))
        engine.add(engine.make_sequence(with_ids, None, params, events.append))
        while engine.has_work():
            engine.step()
        chosen.append(finished(events).token_ids[0])
    assert chosen == [int(top.indices[0]), runner_up]


def test_contrast_bad_input_and_cancel_free_both_rows(base, tokenizer):
    from dataclasses import replace

    from sidecar.engine.api import Contrast

    ids = prompt(tokenizer, LINES[0])
    contrasted = replace(GREEDY, max_tokens=50, contrast=Contrast(tuple(prompt(tokenizer, LINES[1])), 0.5))
    with pytest.raises(UserError, match="contrast: weight"):
        Contrast((1, 2), 0.0)
    with pytest.raises(UserError, match="contrast: prompt_without is empty"):
        Contrast((), 0.5)
    with pytest.raises(UserError, match="max_batch >= 2"):
        LLMEngine(base, EngineConfig(max_batch=1)).make_sequence(ids, None, contrasted, print)
    engine = LLMEngine(base, EngineConfig(max_batch=2, prefix_cache_mb=0))
    with pytest.raises(UserError, match="choices"):
        engine.make_sequence(ids, None, contrasted, print, choices=[[5]])
    # Cancelled after its shadow's prompt went through (the reply's is next), and while both decode.
    for steps_before_cancel in (1, 4):
        events = []
        seq = engine.make_sequence(ids, None, contrasted, events.append)
        engine.add(seq)
        for _ in range(steps_before_cancel):
            engine.step()
        assert (seq.shadow.status.value, len(engine.kv.running)) == (("prefilling", 0) if steps_before_cancel == 1
                                                                      else ("running", 2))
        engine.abort(seq)
        while engine.has_work():
            engine.step()
        assert finished(events).finish_reason == "cancelled" and not engine.kv.running
        assert seq.shadow.status.value == "finished" and engine.scheduler.prefilling is None


def test_a_contrasted_reply_keeps_its_place_in_the_queue(base, tokenizer):
    """One row free, a contrasted reply (two rows) first in the queue and a plain one behind it: the plain one
    does not take the row; the contrasted reply starts first, once the running reply leaves."""
    from dataclasses import replace

    from sidecar.engine.api import Contrast

    engine = LLMEngine(base, EngineConfig(max_batch=2, prefix_cache_mb=0))
    order = []
    seen = lambda name: lambda event: order.append(name) if event.kind == "started" else None  # noqa: E731
    engine.add(engine.make_sequence(prompt(tokenizer, LINES[0]), None, replace(GREEDY, max_tokens=4), seen("running")))
    engine.step()  # its prompt goes through: it holds one of the two rows
    contrast = Contrast(tuple(prompt(tokenizer, LINES[1])), 0.5)
    engine.add(engine.make_sequence(prompt(tokenizer, LINES[2]), None, replace(GREEDY, contrast=contrast),
                                    seen("contrasted")))
    engine.add(engine.make_sequence(prompt(tokenizer, LINES[3]), None, GREEDY, seen("plain")))
    while engine.has_work():
        engine.step()
    assert order == ["running", "contrasted", "plain"]
