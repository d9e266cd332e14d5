"""AsyncEngine from asyncio code: streaming order, cancel by closing the stream, queue limit."""

from __future__ import annotations

import asyncio
import sys

import pytest

from sidecar.config import EngineConfig
from sidecar.engine.api import QueueFull, SamplingParams
from sidecar.engine.base_model import BaseModel
from sidecar.engine.engine import AsyncEngine
from sidecar.engine.tokenizer import ChatMessage


@pytest.fixture(scope="module")
def base(models, tokenizer, model_path) -> BaseModel:
    return BaseModel(model_path, models("int4"), tokenizer)


def ids(tokenizer, line: str) -> list[int]:
    return tokenizer.encode_chat([ChatMessage("user", line)])


def test_stream_order_cancel_and_queue_limit(base, tokenizer):
    async def main() -> None:
        engine = AsyncEngine(base, EngineConfig(max_batch=2, max_waiting=2))
        try:
            stream = engine.submit(ids(tokenizer, "Hello!"), None, SamplingParams(max_tokens=12))
            kinds = [e.kind async for e in stream]
            assert kinds[0] == "started" and kinds[-1] == "finished" and set(kinds[1:-1]) <= {"delta"}

            # Closing a stream early cancels the request; the engine forgets it within a step.
            long = engine.submit(ids(tokenizer, "Tell me a long story."), None,
                                 SamplingParams(max_tokens=500, ignore_eos=True))
            events = aiter(long)
            while (await anext(events)).kind != "delta":
                pass
            await events.aclose()  # what a gRPC handler does when its client goes away
            for _ in range(100):
                if engine.stats().active_sequences == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.stats().active_sequences == 0

            # Two running, two waiting: the fifth request is refused at once.
            params = SamplingParams(max_tokens=200, ignore_eos=True)
            streams = [engine.submit(ids(tokenizer, f"Line {i}"), None, params) for i in range(2)]
            for _ in range(200):
                if engine.stats().active_sequences == 2:
                    break
                await asyncio.sleep(0.02)
            streams += [engine.submit(ids(tokenizer, f"Line {i}"), None, params) for i in range(2, 4)]
            with pytest.raises(QueueFull):
                engine.submit(ids(tokenizer, "one more"), None, params)
            for s in streams:
                s.cancel()
            reasons = []
            for s in streams:
                async for event in s:
                    if event.kind == "finished":
                        reasons.append(event.finish_reason)
            assert reasons and set(reasons) <= {"cancelled", "length"}
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_queue_full_agrees_with_submit(base, tokenizer, monkeypatch):
    """queue_full() is the servicer's cheap early refusal; submit() stays the authority. Requests move
    from the inbox to the scheduler under the engine's lock, so neither ever counts one in neither place."""
    async def main() -> None:
        engine = AsyncEngine(base, EngineConfig(max_batch=1, max_waiting=1))
        moved_under_lock = []
        real_add = engine.core.add
        monkeypatch.setattr(engine.core, "add", lambda seq: (moved_under_lock.append(engine._lock.locked()),
                                                             real_add(seq)))
        try:
            params = SamplingParams(max_tokens=200, ignore_eos=True)
            assert not engine.queue_full()
            streams = [engine.submit(ids(tokenizer, "Line 0"), None, params)]
            for _ in range(200):
                if engine.stats().active_sequences == 1:
                    break
                await asyncio.sleep(0.02)
            streams.append(engine.submit(ids(tokenizer, "Line 1"), None, params))
            assert engine.queue_full() and engine.stats().waiting_requests == 1
            with pytest.raises(QueueFull):
                engine.submit(ids(tokenizer, "one more"), None, params)
            scored = [e async for e in engine.submit(ids(tokenizer, "Line 2"), None, SamplingParams(max_tokens=1),
                                                     choices=[[5], [6]])]
            assert scored[-1].finish_reason == "choice"  # scoring is never refused
            for s in streams:
                s.cancel()
            for s in streams:
                _ = [e async for e in s]
            assert not engine.queue_full()
            assert moved_under_lock and all(moved_under_lock)
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_a_failing_step_ends_its_batch_and_the_engine_keeps_serving(base, tokenizer, monkeypatch):
    async def main() -> None:
        engine = AsyncEngine(base, EngineConfig(max_batch=2))
        try:
            real_step, failures = engine.core.step, []

            def step_once_broken() -> None:
                if engine.core.scheduler.running and not failures:
                    failures.append(1)
                    raise RuntimeError("simulated kernel failure")
                real_step()

            monkeypatch.setattr(engine.core, "step", step_once_broken)
            events = [e async for e in engine.submit(ids(tokenizer, "Hello!"), None, SamplingParams(max_tokens=20))]
            assert events[-1].kind == "error" and events[-1].internal and "simulated" in events[-1].error
            after = [e async for e in engine.submit(ids(tokenizer, "Hi again"), None, SamplingParams(max_tokens=4))]
            assert after[-1].kind == "finished" and after[-1].finish_reason in ("stop", "length") and after[-1].text
            assert engine.stats().active_sequences == 0
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_stats_while_adapters_load_and_evict(base, tokenizer, peft_reference):
    """ServerInfo reads stats() on the event loop while the engine thread loads and evicts adapters (4
    adapters, 2 slots, two players cycling through them): it must never read the engine's structures
    mid-change. The threads switch as often as the interpreter allows; before stats() read a snapshot,
    this met "dictionary changed size during iteration" in most runs."""
    async def main() -> tuple[list, set, list, int, int]:
        engine = AsyncEngine(base, EngineConfig(max_batch=4, max_resident_adapters=2))
        refs = [engine.load_adapter(name, folder, "1") for name, folder in peft_reference[1].items()]
        done, errors, shapes, reads = asyncio.Event(), [], set(), [0]

        async def hammer() -> None:
            while not done.is_set():
                for _ in range(100):
                    try:
                        shapes.add(engine.stats().resident_adapters)
                    except Exception as e:  # noqa: BLE001 - any failure is what this test looks for
                        errors.append(e)
                reads[0] += 100
                await asyncio.sleep(0)

        async def player(first: int) -> list:
            ends = []
            for i in range(first, first + 12):
                events = [e async for e in engine.submit(ids(tokenizer, f"Line {i}"), refs[i % len(refs)],
                                                         SamplingParams(max_tokens=2, ignore_eos=True))]
                ends.append(events[-1])
            return ends

        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            reader = asyncio.ensure_future(hammer())
            ended = [e for ends in await asyncio.gather(player(0), player(1)) for e in ends]
            done.set()
            await reader
        finally:
            sys.setswitchinterval(switch)
            await engine.shutdown()
        return ended, shapes, errors, reads[0], engine.core.adapters.evictions

    ended, shapes, errors, reads, evictions = asyncio.run(main())
    assert not errors, errors[:3]
    assert len(ended) == 24 and all(e.kind == "finished" and e.finish_reason == "length" for e in ended)
    assert evictions >= 4 and reads > 10_000  # the adapters came and went while stats were read
    assert all(len(shape) <= 2 for shape in shapes) and len(shapes) >= 3  # ...and the reader saw them change
