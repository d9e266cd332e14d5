"""The multi-NPC bench's token check (sidecar/bench/agreement.py) on made-up runs: it must refuse a
speed ratio when the sidecar's tokens are garbage, adapter-less or short, and when the check itself
could not have told (the control without adapters passed too). Real scoring: tests/test_peer_*.py."""

from __future__ import annotations

import pytest

from sidecar.bench import multi_npc
from sidecar.bench.agreement import NEAR_TIE, compare, gap_summary
from sidecar.cli import main as cli_main

TOKENS = 6
PEER_IDS = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]


def _result(system: str, token_ids: list[list[int]], tok_s: float, scores: dict | None = None) -> dict:
    r = {"system": system, "n": len(token_ids), "tok_s": tok_s, "ttft_p50_ms": 50.0, "ttft_p95_ms": 60.0,
         "itl_p50_ms": 10.0, "itl_p99_ms": 20.0, "tokens": TOKENS * len(token_ids), "rss_mb": 900.0,
         "token_ids": token_ids}
    if scores is not None:
        r["scores"] = {system: [gap_summary(g) for g in gaps] for system, gaps in scores.items()}
    return r


def _run(sidecar_ids, sidecar_gaps, control_gaps=None) -> dict:
    """npc-sidecar, the control and hf-peft at N=2, hf-peft having scored both systems' tokens."""
    scores = {"npc-sidecar": sidecar_gaps}
    results = [_result("npc-sidecar", sidecar_ids, 400.0)]
    if control_gaps is not None:
        results.append(_result("npc-sidecar-no-lora", [[1] * TOKENS, [2] * TOKENS], 500.0))
        scores["npc-sidecar-no-lora"] = control_gaps
    results.append(_result("hf-peft", PEER_IDS, 100.0, scores))
    return {"scenario": "multi-npc", "model": "m.gguf", "tokens": TOKENS, "rank": 16, "skipped_peers": [],
            "machine": {"cpu": "Some CPU", "cores": 2, "torch": "2.13.0", "date": "2026-12-01 12:00 UTC"},
            "results": results}


# A correct sidecar: its replies flip at a near-tie in step 2 of NPC 1, then go on differently.
FLIPPED = [PEER_IDS[0], [11, 12, 99, 98, 97, 96]]
CORRECT_GAPS = [[0.0] * TOKENS, [0.0, 0.0, 0.12, 0.0, 0.3, 0.0]]
ADAPTERLESS_GAPS = [[0.0, 2.7, 0.0, 4.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 3.3]]


def test_a_correct_sidecar_is_verified_and_gets_its_ratio():
    data = _run(FLIPPED, CORRECT_GAPS, ADAPTERLESS_GAPS)
    (entry,) = compare(data["results"])
    assert entry["verified"] and entry["peer"] == "hf-peft" and entry["n"] == 2
    assert entry["sidecar"]["identical_replies"] == 1 and entry["sidecar"]["common_prefix_mean"] == 4.0
    assert entry["sidecar"]["worst_gap"] == 0.3 and (entry["sidecar"]["worst_npc"], entry["sidecar"]["worst_step"]) \
        == (1, 4)
    assert not entry["control"]["agrees"] and entry["control"]["worst_gap"] == 4.1
    md = multi_npc._markdown(data)
    assert "| hf-peft | 2 | 100 |" in md and "| 4.00x |" in md and "UNVERIFIED" not in md and "| verified |" in md


@pytest.mark.parametrize("case", ["garbage", "adapter-less", "short", "control passes"])
def test_the_check_fails_and_the_ratio_is_refused(case, monkeypatch, capsys):
    control = ADAPTERLESS_GAPS
    if case == "garbage":  # random ids: the peer puts them tens of logits below its best
        ids, gaps = [[40000 + i for i in range(TOKENS)]] * 2, [[17.0, 22.5, 19.1, 30.2, 12.0, 25.0]] * 2
    elif case == "adapter-less":  # what the control scored: the sidecar served the bare model
        ids, gaps = [[1] * TOKENS, [2] * TOKENS], ADAPTERLESS_GAPS
    elif case == "short":  # a reply cut short agrees on every step it has, but is not the peer's work
        ids, gaps = [PEER_IDS[0][:3], PEER_IDS[1]], [[0.0] * 3, [0.0] * TOKENS]
    else:  # adapters too weak to matter: the control is within the near-tie too, so agreement proves nothing
        ids, gaps, control = FLIPPED, CORRECT_GAPS, [[0.0, NEAR_TIE / 2, 0.0, 0.0, 0.0, 0.0], [0.0] * TOKENS]
    data = _run(ids, gaps, control)
    (entry,) = compare(data["results"])
    assert not entry["verified"] and entry["why"]
    md = multi_npc._markdown(data)
    assert "**unverified**" in md and "x |" not in md.split("| hf-peft | 2 |")[1].splitlines()[0]
    assert md.startswith("> **UNVERIFIED**: against hf-peft at N=2") and "**NOT VERIFIED**" in md

    # `npc bench` reports it and exits non-zero.
    monkeypatch.setattr(multi_npc, "run_multi_npc_bench", lambda cfg: data)
    assert cli_main(["bench", "--scenario", "multi-npc", "--peers", "hf-peft", "--n", "2"]) == 1
    err = capsys.readouterr().err
    assert "UNVERIFIED against hf-peft at N=2" in err and "no speed ratio" in err


def test_without_the_control_the_sidecar_alone_decides():
    # On a GPU the control runs last, after the peers: it is not scored, and "not run" is reported.
    data = _run(FLIPPED, CORRECT_GAPS)
    (entry,) = compare(data["results"])
    assert entry["verified"] and entry["control"] is None and "not run" in multi_npc._markdown(data)
