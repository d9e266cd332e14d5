"""engine/output.py: the one place where a request's token ids become events, on every backend
(the torch engine one id per step; TensorRT-LLM cumulative lists; a remote server chunks)."""

from __future__ import annotations

from sidecar.engine.api import SamplingParams, Timings
from sidecar.engine.output import RequestOutput
from sidecar.engine.tokenizer import Detokenizer

# Token id -> bytes: 0 is eos; 5 + 6 spell "é" across two tokens.
PIECES = [b"", b"Hi", b" there.\nPla", b"yer: go", b" on", b"\xc3", b"\xa9", b"!"]


def builder(params: SamplingParams | None = None, max_tokens=10) -> RequestOutput:
    return RequestOutput("r1", 4, params or SamplingParams(max_tokens=10), max_tokens, Detokenizer(PIECES),
                         eos_ids=(0,), timings=Timings())


def test_events_from_cumulative_outputs_until_eos():
    ev = builder()
    assert ev.started().kind == "started"
    out = ev.update([1], None) + ev.update([1, 5], None) + ev.update([1, 5, 6, 7], None) + ev.update([1, 5, 6, 7, 0],
                                                                                                     None)
    assert [(e.kind, e.text, e.token_ids) for e in out[:-1]] == [
        ("delta", "Hi", (1,)), ("delta", "é", (5, 6)), ("delta", "!", (7,))]  # never half a character
    fin = out[-1]
    assert (fin.kind, fin.finish_reason, fin.text, fin.token_ids) == ("finished", "stop", "Hié!", (1, 5, 6, 7))
    assert (fin.prompt_tokens, fin.completion_tokens) == (4, 4) and fin.total_ms >= fin.first_token_ms > 0
    assert ev.update([1, 5, 6, 7, 0, 3], None) == [] and ev.cancel() == []  # finished is final


def test_stop_string_inside_a_token_ends_the_reply():
    ev = builder(SamplingParams(max_tokens=10, stop=("\nPlayer:",)))
    out = ev.update([1, 2], None)  # " there.\nPla" may be the start of the stop: held back
    assert [e.text for e in out] == ["Hi", " there."]
    out = ev.update([1, 2, 3], None)  # "yer: go" completes it, mid-token
    assert [(e.kind, e.finish_reason, e.text) for e in out] == [("finished", "stop", "Hi there.")]
    assert out[-1].token_ids == (1, 2, 3)

    dot = builder(SamplingParams(max_tokens=10, stop=(".",)))
    out = dot.update([1, 2, 3, 4], None)  # several tokens in one step; the stop sits inside the second
    assert [(e.kind, e.text) for e in out] == [("delta", "Hi"), ("delta", " there"), ("finished", "Hi there")]
    assert dot.finished and out[-1].completion_tokens == 2


def test_length_cancel_and_engine_finish_reasons():
    ev = builder(max_tokens=2)
    out = ev.update([1, 4, 7], None)  # TensorRT-LLM may run past our limit: we stop at 2
    assert [e.kind for e in out] == ["delta", "delta", "finished"]
    assert (out[-1].finish_reason, out[-1].text) == ("length", "Hi on")

    held = builder(SamplingParams(max_tokens=10, stop=("\nPlayer:",)))
    held.update([1, 2], None)
    (fin,) = held.cancel()
    assert (fin.finish_reason, fin.text, fin.token_ids) == ("cancelled", "Hi there.", (1, 2))  # held text dropped

    for reason, ours in (("stop", "stop"), ("length", "length"), ("cancelled", "cancelled"), ("timeout", "cancelled")):
        ev = builder(SamplingParams(max_tokens=10, stop=("Pla",)))
        out = ev.update([1, 4, 5], reason)  # ends with an incomplete "é" and a reason from TensorRT-LLM
        assert out[-1].finish_reason == ours
        assert out[-1].text == ("Hi on\ufffd" if ours != "cancelled" else "Hi on")  # a stop flushes, cancel drops




def test_choice_sums_each_tokens_own_log_probability_and_picks_the_likeliest():
    out = builder()
    event = out.choice([[-0.5, -0.25], [-0.1], [-0.1, -0.0]])
    assert (event.kind, event.finish_reason, event.choice) == ("finished", "choice", 1)  # the first of equals
    assert event.choice_logprobs == (-0.75, -0.1, -0.1)
    assert event.choice_token_logprobs == ((-0.5, -0.25), (-0.1,), (-0.1, -0.0))


def test_timings_count_from_the_arrival_and_first_text():
    timings = Timings(arrival=100.0)
    assert timings.ms(now=100.5) == {"queue_ms": 500.0, "first_token_ms": 0.0, "total_ms": 500.0}  # no text yet
    timings.started, timings.first_text = 100.25, 100.375
    assert timings.ms(now=101.0) == {"queue_ms": 250.0, "first_token_ms": 375.0, "total_ms": 1000.0}
