"""`npc bench --scenario constrained` (sidecar/bench/constrained.py) at a tiny size, on the random-weight
`tiny` model: a test of the harness and of what its report states, not of speed (~5 s)."""

from __future__ import annotations

import json

import pytest

from sidecar.bench import constrained
from sidecar.bench.random_model import ensure_random_model
from sidecar.dialogue.reply_format import ReplyFormat

N, TEXT_TOKENS = 2, 12


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("constrained")
    model = ensure_random_model(root / "models", "tiny", progress=False)
    out = root / "bench"
    assert constrained.main(["--model", str(model), "--n", str(N), "--tokens", str(TEXT_TOKENS), "--rounds", "2",
                             "--out", str(out), "--workdir", str(root / "work")]) == 0
    return json.loads((out / "constrained.json").read_text()), out


def test_both_kinds_run_the_same_turns_every_round(report):
    data, _ = report
    s = data["summary"]
    assert [r["first"] for r in s["rounds"]] == ["free", "constrained"]  # the order alternates
    for r in s["rounds"]:
        assert r["free_tok_s"] > 0 and r["constrained_tok_s"] > 0
        assert r["ratio"] == pytest.approx(r["constrained_tok_s"] / r["free_tok_s"])
        # The free turns generate exactly what the constrained ones sampled (greedy: the same every run).
        assert r["free_tokens"] == r["constrained_tokens"] > 0
    assert s["constrained_replies_identical_across_runs"]
    assert min(s["ratio_min"], s["ratio_max"]) <= s["ratio_median"] <= max(s["ratio_min"], s["ratio_max"])
    assert len(data["runs"]) == 4 and {run["kind"] for run in data["runs"]} == {"free", "constrained"}
    last = [run for run in data["runs"] if run["kind"] == "constrained"][-1]
    assert data["free_max_tokens"] == [q["sampled_tokens"] for q in last["requests"]]


def test_constrained_replies_follow_the_format_and_free_ones_have_no_grammar(report):
    data, _ = report
    for run in data["runs"]:
        for q in run["requests"]:
            character = constrained.npc_character(q["npc"])
            if run["kind"] == "free":
                assert q["forced_tokens"] == 0 and "emotion_step" not in q
                assert q["sampled_tokens"] == data["free_max_tokens"][q["npc"]]
                continue
            assert q["forced_tokens"] >= 1  # the grammar's "[" is prefilled with the prompt
            assert q["emotion"] in character.emotions and q["finish_reason"] in ("stop", "length")
            assert 1 <= q["emotion_token"] <= q["sampled_tokens"]
            assert q["emotion_step"] >= q["first_token_step"] >= 0
            assert q["emotion_ms"] is not None and q["emotion_ms"] >= q["ttft_ms"] > 0
            if "parsed" in q:  # the last round's replies (the JSON keeps their text)
                assert q["parsed"]["emotion"] == q["emotion"] and q["text"].startswith(f"[{q['emotion']}] ")
                names = {a.name for a in character.actions}
                assert all(a["name"] in names for a in q["parsed"]["actions"])


def test_emotion_prefill_and_step_figures_add_up(report):
    data, _ = report
    s = data["summary"]
    replies = N * len(s["rounds"])
    assert sum(s["emotion_token"].values()) + s["replies_without_emotion"] == replies
    assert sum(s["emotion_steps_after_free_first_token"].values()) == sum(s["emotion_token"].values())
    # One prefill per reply, free or constrained; the constrained prompt is longer by the forced opening only.
    assert s["prefill_passes_per_reply"] == {"1": 2 * replies} and s["prefill_tokens_match_prompt"]
    forced = {q["forced_tokens"] for run in data["runs"] if run["kind"] == "constrained" for q in run["requests"]}
    tokens = s["prefill_tokens_per_reply"]
    assert tokens["constrained"] - tokens["free"] == pytest.approx(sum(forced) / len(forced))
    assert [t["met"] for t in s["targets"]][1:] == [max(map(int, s["emotion_steps_after_free_first_token"])) <= 1,
                                                    True]
    # Masks are computed only where a grammar is: never in a free run, in every constrained step that decodes
    # a constrained row; a step's parts run one after another within it. (The JSON keeps the last round's
    # steps, one list per field.)
    for run in data["runs"]:
        assert ("steps" in run) == (run["round"] == len(s["rounds"]) - 1)
        if "steps" not in run:
            assert "sampled_ids" not in run["requests"][0]
            continue
        st = run["steps"]
        assert len({len(values) for values in st.values()}) == 1 and len(st["step_ms"]) == run["engine_steps"]
        for i in range(len(st["step_ms"])):
            if run["kind"] == "free":
                assert st["mask_ms"][i] == 0 and "apply_ms" not in st and "wait_ms" not in st
            elif st["constrained_rows"][i]:
                assert st["mask_ms"][i] > 0 and st["apply_ms"][i] > 0
            inner = sum(st[key][i] for key in ("forward_ms", "prefill_ms", "sample_ms", "accept_ms") if key in st)
            assert st["step_ms"][i] >= inner - 0.01 and inner > 0
    for kind in ("decode_step_ms", "prefill_step_ms"):
        assert s[kind]["free"]["mask_ms"] in (0, None)


def test_report_files(report):
    data, out = report
    md = (out / "constrained.md").read_text()
    assert md.startswith("Constrained turns: 2 NPCs") and "| **median** |" in md and "one prefill per reply" in md
    assert (out / "constrained.png").stat().st_size > 10_000
    assert data["grammar_example"] == ReplyFormat(*_format(0), text_max_tokens=TEXT_TOKENS).grammar()


def _format(i: int):
    from sidecar.dialogue.reply_format import reply_format

    character = constrained.npc_character(i)
    fmt = reply_format(character.emotions, character.actions, constrained.npc_entities(i), None)
    return fmt.emotions, fmt.actions, fmt.entities


def test_warm_prefix_cache_runs_reuse_the_personas(tmp_path):
    model = ensure_random_model(tmp_path / "models", "tiny", progress=False)
    assert constrained.main(["--model", str(model), "--n", str(N), "--tokens", "6", "--rounds", "1", "--warm",
                             "--out", str(tmp_path / "bench"), "--workdir", str(tmp_path / "work")]) == 0
    data = json.loads((tmp_path / "bench" / "constrained_warm.json").read_text())
    assert data["warm_prefix_cache"] and not (tmp_path / "bench" / "constrained.json").exists()
    s = data["summary"]
    (r,) = s["rounds"]
    assert r["free_tokens"] == r["constrained_tokens"]
    # Only the uncached tail of each prompt is prefilled, once per reply.
    assert s["prefill_passes_per_reply"] == {"1": 2 * N} and s["prefill_tokens_match_prompt"]
    assert max(s["prefill_tokens_per_reply"].values()) < min(data["prompt_tokens"]) / 4
