"""Whether the systems the multi-NPC bench times compute the same replies: greedy tokens, NPC by NPC.

A speed ratio means something only between systems doing the same work: a sidecar that served the
wrong adapter, none, or garbage would still top the table. So every system records the greedy token
ids of each NPC, and each peer, after its timed run, scores the sidecar's tokens under its own model
and the same adapter (teacher forcing: the sidecar's prompt and tokens decoded as if the peer had
chosen them), noting at every step the gap between its best logit and the logit of the sidecar's
token: 0 where both choose the same.

Why gaps, not equal tokens: the systems round differently (the sidecar runs int4 weights with bf16
activations, llama.cpp its Q4_1 kernels on 8-bit activations, transformers + PEFT the same weights
dequantized to float32), so wherever two tokens are nearly tied the greedy choice may flip, and after
a flip the two replies go on differently: equal tokens over 64 steps would fail correct systems.
Scoring along the sidecar's own path keeps checking after a flip, and accepts one only at a near-tie:
every token of every NPC must be within NEAR_TIE logits of the peer's best.

NEAR_TIE, measured on SmolLM2-135M Q4_1 with the workload's adapters (8 NPCs x 64 tokens, scored
by both peers): the sidecar's tokens lie at most 0.24 logits below hf-peft's best and 0.33 below
llama.cpp's, and the two peers score each other's tokens within 0.16; the same engine without the
adapters (the npc-sidecar-no-lora control) parts from the peers within 0-4 tokens and every one of
its NPCs has tokens 1.6-4.8 logits below the peer's best. 1.0 sits 3x above the numeric noise and
below every NPC's adapter effect. Garbage tokens score tens of logits away. The control is scored
too: if it passed (no NPC beyond NEAR_TIE), the check could not have told a sidecar that ignores its
adapters from a correct one, so the sidecar's agreement would prove nothing.
"""

from __future__ import annotations

from statistics import mean

NEAR_TIE = 1.0  # logits
SIDECAR, CONTROL = "npc-sidecar", "npc-sidecar-no-lora"
SCORED = (SIDECAR, CONTROL)  # the systems whose tokens each peer scores


def gap_summary(gaps: list[float]) -> dict:
    """What the judgement needs of one NPC's gaps: the largest, its step, and the steps the peer chose otherwise."""
    if not gaps:
        return {"max_gap": None, "at": None, "disagreements": 0, "steps": 0}
    at = max(range(len(gaps)), key=gaps.__getitem__)
    return {"max_gap": round(gaps[at], 3), "at": at, "disagreements": sum(g > 0 for g in gaps), "steps": len(gaps)}


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two replies share before they first differ."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def judge(scores: list[dict], ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """One scored system against one peer: every NPC's tokens must all lie within NEAR_TIE of the peer's best."""
    agreeing = [s["max_gap"] is not None and s["max_gap"] <= NEAR_TIE and s["steps"] == len(p)
                for s, p in zip(scores, theirs, strict=True)]
    known = [i for i, s in enumerate(scores) if s["max_gap"] is not None]
    worst = max(known, key=lambda i: scores[i]["max_gap"], default=None)
    prefixes = [common_prefix(a, b) for a, b in zip(ours, theirs, strict=True)]
    return {"agrees": all(agreeing), "npcs": len(scores), "npcs_agreeing": sum(agreeing),
            "worst_gap": scores[worst]["max_gap"] if worst is not None else None,
            "worst_npc": worst, "worst_step": scores[worst]["at"] if worst is not None else None,
            "disagreements": sum(s["disagreements"] for s in scores),
            "identical_replies": sum(a == b for a, b in zip(ours, theirs, strict=True)),
            "common_prefix_mean": round(mean(prefixes), 1) if prefixes else None}


def compare(results: list[dict]) -> list[dict]:
    """For every peer run that scored the sidecar's tokens: the sidecar's and the control's judgement, and
    whether the peer's speed ratio is verified (the sidecar agrees, and the control, if run, does not)."""
    by = {(r["system"], r["n"]): r for r in results}
    entries = []
    for r in results:
        if "scores" not in r or (SIDECAR, r["n"]) not in by:
            continue
        judged = {system: judge(r["scores"][system], by[(system, r["n"])]["token_ids"], r["token_ids"])
                  for system in SCORED if system in r["scores"] and (system, r["n"]) in by}
        sidecar, control = judged.get(SIDECAR), judged.get(CONTROL)
        if sidecar is None:
            why = "the sidecar's tokens were not scored"
        elif not sidecar["agrees"]:
            why = (f"{sidecar['npcs'] - sidecar['npcs_agreeing']} of {sidecar['npcs']} NPCs have tokens more than "
                   f"{NEAR_TIE:g} logits below the peer's best (worst {sidecar['worst_gap']}, NPC "
                   f"{sidecar['worst_npc']}, step {sidecar['worst_step']})")
        elif control is not None and control["agrees"]:
            why = "the control without adapters passed too: the check cannot tell the adapters apart"
        else:
            why = ""
        entries.append({"peer": r["system"], "n": r["n"], "sidecar": sidecar, "control": control,
                        "verified": not why, "why": why})
    return entries


def verified(entries: list[dict], peer: str, n: int) -> bool:
    return any(e["peer"] == peer and e["n"] == n and e["verified"] for e in entries)


def markdown(entries: list[dict]) -> str:
    """The report's section: per peer and N, how the sidecar's tokens (and the control's) scored."""
    if not entries:
        return ""

    def cell(j: dict | None) -> str:
        if j is None:
            return "not run"
        return (f"{j['npcs_agreeing']}/{j['npcs']} NPCs within {NEAR_TIE:g}; worst {j['worst_gap']} "
                f"(NPC {j['worst_npc']}, step {j['worst_step']}); {j['identical_replies']} identical replies, "
                f"{j['common_prefix_mean']} tokens in common on average")

    from sidecar.bench.report import markdown_table

    rows = [[e["peer"], e["n"], cell(e["sidecar"]), cell(e["control"]),
             "verified" if e["verified"] else f"**NOT VERIFIED**: {e['why']}"]
            for e in sorted(entries, key=lambda e: (e["n"], e["peer"]))]
    text = (f"Same replies? Each peer scored the sidecar's greedy tokens under its own model and the same adapter "
            f"(teacher forcing): every token must be within {NEAR_TIE:g} logits of the peer's best (a near-tie, "
            "where rounding may flip the choice; after a flip the replies differ, which is why identical replies "
            "are not required). npc-sidecar-no-lora, the same engine without adapters, is the control: it must "
            "fail, or the check could not tell. A speed ratio is reported only against a peer that verified.\n\n")
    return text + markdown_table(["peer", "N", "npc-sidecar", "control (no LoRA)", "verdict"], rows)
