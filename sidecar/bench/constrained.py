"""`npc bench --scenario constrained`: N NPC turns free and under the turn grammar, on one engine (issue 15).

    python -m sidecar.bench.constrained --n 8 [--tokens 64] [--rounds 5] [--warm] [--out docs/bench]

(`npc bench --scenario constrained` once sidecar/cli.py routes that scenario here.)

The issue's target: at N NPCs with distinct adapters, all constrained, aggregate tokens/s >= 0.9x the
same turns unconstrained; the emotion known no later than one engine step after the first token would
have come; no extra prefill per reply.

Workload: N NPCs, each with its own random LoRA adapter (multi_npc.prepare: the same folders as
`--scenario multi-npc`), a character of its own (workload.persona, 5 emotion labels, 2-3 actions with
arguments from the request's entity lists of 6 values, integers, booleans) and the prompt the server
builds for it (dialogue/prompt.build_messages: persona, the emotion and action guidance, the entities at
hand, the player's line). One engine (a subprocess of its own, as multi-npc's runs) serves, in every round,
the same N turns twice, one kind after the other and the order alternating between rounds:

- constrained: `ReplyFormat.sampling(SamplingParams(max_tokens=text budget), ...)`: the turn grammar,
  greedy; each reply ends where the model ends it (EOS) or where the grammar's budgets end it;
- free: the same prompts, greedy, no grammar, each NPC generating exactly as many tokens as its reply
  sampled in the latest constrained run (ignore_eos): the same turns, the same forward work, the same
  batch at every step, so the difference is what the grammar costs.

The prefix cache is emptied before every run (every persona cold, as in multi-npc), or with --warm kept
(every persona cached by the warm-up runs, as in a game that talks to its NPCs again: prefill shrinks to
the turn's own tokens and decode, where the grammar's cost is, dominates). Tokens/s counts the tokens the
engine sampled (each one row of a forward; a constrained reply's closing EOS is one, its prefilled "["
is not) over the time from the first submit to the last finished event.

Without changing the engine, a probe (`_Probe`) wraps a few of the live engine's attributes to time each
step's parts: the decode forward, the mask computation on the grammar thread, the time the engine waits
for it after the forward, applying the masks, sampling, and accepting tokens (the matchers' consume);
and to record which step sampled each request's tokens and every prefill chunk of each request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sidecar.bench.report import machine_description, markdown_table, targets_table, to_json, write_report
from sidecar.bench.workload import ADAPTER_STD, persona, player_line
from sidecar.figures import pyplot

RATIO_TARGET = 0.9
SERVER_TOKEN_CAP = 512  # npc serve's default request limit max_tokens: what fmt.sampling may raise a reply to


@dataclass(frozen=True)
class ConstrainedConfig:
    """One `npc bench --scenario constrained` run."""

    model: Path
    n: int = 8
    text_tokens: int = 64  # each turn's text budget (the base SamplingParams.max_tokens)
    rounds: int = 5  # timed rounds, each one free run and one constrained run
    rank: int = 16
    workdir: Path = Path("/tmp/npc-bench-multi")  # shared with multi-npc: the same random adapters
    out_dir: Path = Path("docs/bench")
    json_path: Path | None = None
    device: str = "cpu"
    weights: str = "auto"
    run_timeout: float | None = None  # seconds the measuring subprocess may take
    warm: bool = False  # keep the prefix cache (every persona cached by the warm-up) instead of emptying it

    def __post_init__(self) -> None:
        if self.n < 1 or self.text_tokens < 1 or self.rounds < 1:
            raise ValueError("n, text_tokens and rounds must be at least 1")

    @property
    def report_name(self) -> str:
        return ("constrained" if self.device == "cpu" else "constrained_gpu") + ("_warm" if self.warm else "")


# --- the NPCs' turns ------------------------------------------------------------------------------

EMOTION_SETS = (("gruff", "proud", "annoyed", "amused", "sad"),
                ("cheerful", "wary", "tired", "curious", "angry"),
                ("calm", "nervous", "suspicious", "relieved", "grim"),
                ("friendly", "scornful", "bored", "excited", "worried"))
STOCK = ("iron sword", "steel axe", "hammer", "oak shield", "healing potion", "rope", "lantern", "bread",
         "ale", "map of the marsh")
QUESTS = ("find the missing sheep", "clean the old well", "watch the marsh lights", "deliver a letter",
          "collect the tax debt", "escort the miller", "hunt the marsh wolf", "fetch sulphur samples")
LOCATIONS = ("mill", "old well", "north road", "marsh", "tavern", "chapel", "ferry", "watchtower")


def npc_character(i: int):
    """NPC i's character: its persona, five emotions and two or three typed actions."""
    from sidecar.dialogue.actions import ActionSpec, Argument
    from sidecar.dialogue.characters import Character

    sell = ActionSpec("sell_item", "Sell the player an item from your stock at a price you name.",
                      (Argument("item", "enum", values_from="stock"), Argument("price", "integer", min=1, max=1000)))
    quest = ActionSpec("give_quest", "Give the player a task.",
                       (Argument("quest", "enum", values_from="quests"), Argument("urgent", "boolean")))
    guide = ActionSpec("point_to", "Point the player to a place in the village.",
                       (Argument("place", "enum", values_from="places"), Argument("paid", "boolean"),
                        Argument("distance", "integer", min=0, max=50)))
    actions = (sell, quest, guide) if i % 2 == 0 else (sell, quest)
    return Character(id=f"npc{i}", name=f"Npc{i}", persona=persona(i), version="bench", folder=Path("."),
                     emotions=EMOTION_SETS[i % len(EMOTION_SETS)], actions=actions)


def npc_entities(i: int) -> dict[str, tuple[str, ...]]:
    """NPC i's entity lists: six values each, a different six for every NPC."""
    pick = lambda values: tuple(values[(i + k) % len(values)] for k in range(6))  # noqa: E731
    return {"stock": pick(STOCK), "quests": pick(QUESTS), "places": pick(LOCATIONS)}


@dataclass(frozen=True)
class Turn:
    prompt: list[int]
    fmt: object  # ReplyFormat
    constrained: object  # SamplingParams with the grammar


def npc_turns(tokenizer, n: int, text_tokens: int) -> list[Turn]:
    """Each NPC's prompt as the server builds it, its reply format and its constrained sampling."""
    from sidecar.dialogue.prompt import build_messages
    from sidecar.dialogue.reply_format import reply_format
    from sidecar.engine.api import SamplingParams

    turns = []
    for i in range(n):
        character = npc_character(i)
        fmt = reply_format(character.emotions, character.actions, npc_entities(i), None)
        prompt = tokenizer.encode_chat(build_messages(character, [], player_line(i), fmt=fmt))
        sampling = fmt.sampling(SamplingParams(max_tokens=text_tokens), SERVER_TOKEN_CAP)
        turns.append(Turn(prompt, fmt, sampling))
    return turns


# --- measuring inside the engine, from outside ------------------------------------------------------


class _TimedFuture:
    """The grammar thread's Future of one step's masks; times how long the engine waits on it."""

    def __init__(self, future, probe: _Probe):
        self._future, self._probe = future, probe

    def result(self, timeout=None):
        t = time.perf_counter()
        value = self._future.result(timeout)
        self._probe.add("wait_ms", t)
        return value


class _TimedExecutor:
    """llguidance's LLExecutor: times each batch mask computation (on the grammar thread)."""

    def __init__(self, executor, probe: _Probe):
        self._executor, self._probe = executor, probe

    def unsafe_compute_mask_ptr(self, *args, **kwargs):
        t = time.perf_counter()
        out = self._executor.unsafe_compute_mask_ptr(*args, **kwargs)
        self._probe.mask_ms.append((time.perf_counter() - t) * 1000)
        return out

    def __getattr__(self, name):
        return getattr(self._executor, name)


class _Probe:
    """Per-step timings and per-request records of a live LLMEngine, by wrapping its instance attributes
    (the engine's code is unchanged; every run, free or constrained, goes through the same wrappers).

    All of it runs on the engine thread, except the mask timing (the grammar thread), which a step waits
    for before it ends."""

    def __init__(self, core):
        self.core = core
        self.reset()
        runner, grammars = core.runner, core.grammars
        self._wrap(core, "step", self._step)
        self._wrap(core, "_accept", self._accept)
        self._wrap(runner, "run", self._run)
        self._wrap(runner, "_decode", self._timed("forward_ms"))
        self._wrap(runner, "_forward", self._timed("prefill_ms"))
        self._wrap(runner, "_sample", self._timed("sample_ms"))
        self._wrap(grammars, "apply", self._timed("apply_ms"))
        self._wrap(grammars, "start_masks", lambda orig, *a: _TimedFuture(orig(*a), self))
        grammars._executor = _TimedExecutor(grammars._executor, self)

    def reset(self) -> None:
        self.steps: list[dict] = []
        self.mask_ms: list[float] = []
        self.tokens: dict[str, list[tuple[int, int]]] = {}  # request id -> [(step, token)] sampled
        self.prefill: dict[str, dict] = {}  # request id -> chunks, tokens computed, completions, cached
        self.seqs: dict[str, object] = {}
        self._cur: dict = {}

    @staticmethod
    def _wrap(obj, name: str, wrapper) -> None:
        orig = getattr(obj, name)
        setattr(obj, name, lambda *a, **k: wrapper(orig, *a, **k))

    def add(self, key: str, since: float) -> None:
        self._cur[key] = self._cur.get(key, 0.0) + (time.perf_counter() - since) * 1000

    def _timed(self, key: str):
        def wrapper(orig, *a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self.add(key, t)
        return wrapper

    def _step(self, orig) -> None:
        self._cur = {"step": self.core.steps}
        masks_before = len(self.mask_ms)
        t = time.perf_counter()
        orig()
        self.add("step_ms", t)
        self._cur["mask_ms"] = sum(self.mask_ms[masks_before:])
        self.steps.append(self._cur)

    def _run(self, orig, plan):
        cur, seq = self._cur, plan.prefill
        cur["decode_rows"] = len(plan.decode)
        cur["constrained_rows"] = sum(1 for s in plan.decode if s.matcher is not None)
        if seq is not None:
            lo, hi = plan.prefill_range
            record = self.prefill.setdefault(seq.request_id, {"chunks": 0, "tokens": 0, "completions": 0,
                                                              "cached": seq.cached_tokens,
                                                              "prompt": len(seq.prompt)})
            record["chunks"] += 1
            record["tokens"] += hi - lo
            record["completions"] += plan.completes_prefill
            cur["prefill_tokens"] = hi - lo
            self.seqs[seq.request_id] = seq
        return orig(plan)

    def _accept(self, orig, seq, token: int) -> None:
        self.tokens.setdefault(seq.request_id, []).append((self.core.steps, token))
        t = time.perf_counter()
        orig(seq, token)
        self.add("accept_ms", t)


# --- one run: the N turns, free or constrained -------------------------------------------------------


async def _run(engine, probe: _Probe, turns: list[Turn], refs: list, params: list, kind: str,
               warm: bool = False) -> dict:
    """The N turns at once; what they produced, when, and what the probe saw. Every persona cold (the prefix
    cache emptied first), or with `warm` as the earlier runs left it."""
    if not warm:
        engine.core.kv.prefix.clear()
    probe.reset()
    first_step = engine.core.steps
    start = time.perf_counter()
    finished: list = [None] * len(turns)
    ttft = [0.0] * len(turns)
    emotion_ms: list[float | None] = [None] * len(turns)
    ids: list[str] = [""] * len(turns)
    submit_ms = [0.0] * len(turns)

    async def one(i: int) -> None:
        parser = turns[i].fmt.parser()
        t = time.perf_counter()
        stream = engine.submit(turns[i].prompt, refs[i], params[i])  # a grammar compiles here, on this thread
        submit_ms[i] = (time.perf_counter() - t) * 1000
        ids[i] = stream.request_id
        async for event in stream:
            now = time.perf_counter()
            if event.kind == "delta":
                ttft[i] = ttft[i] or (now - start) * 1000
                parser.push(event.text)
                if emotion_ms[i] is None and parser.emotion:
                    emotion_ms[i] = (now - start) * 1000
            elif event.kind == "finished":
                finished[i] = event
            elif event.kind == "error":
                raise RuntimeError(event.error)

    await asyncio.gather(*[one(i) for i in range(len(turns))])
    wall = time.perf_counter() - start
    requests = []
    for i, turn in enumerate(turns):
        rid, event = ids[i], finished[i]
        seq = probe.seqs[rid]
        steps = [s - first_step for s, _ in probe.tokens.get(rid, [])]
        request = {"npc": i, "prompt_tokens": len(turn.prompt), "forced_tokens": len(seq.prompt) - len(turn.prompt),
                   "sampled_tokens": len(steps), "completion_tokens": event.completion_tokens,
                   "finish_reason": event.finish_reason, "text": event.text, "ttft_ms": ttft[i],
                   "submit_ms": submit_ms[i],
                   "first_token_step": steps[0] if steps else None, "last_step": steps[-1] if steps else None,
                   "prefill": probe.prefill[rid], "sampled_ids": [t for _, t in probe.tokens.get(rid, [])]}
        if kind == "constrained":
            request.update(_emotion(engine.model.tokenizer, turn.fmt, seq.prompt[len(turn.prompt):],
                                    probe.tokens.get(rid, []), first_step))
            request["emotion_ms"] = emotion_ms[i]
            parser = turn.fmt.parse(event.text, event.finish_reason)
            request["parsed"] = {"emotion": parser.emotion, "text": parser.text,
                                 "actions": [a.to_dict() for a in parser.actions]}
            if event.finish_reason == "length":  # cut by max_tokens: was the reply complete all the same?
                matcher = engine.core.grammars.matcher(params[i].grammar)
                matcher.consume_tokens([*seq.prompt[len(turn.prompt):], *request["sampled_ids"]])
                whole = turn.fmt.parse(event.text)
                request["complete_at_cut"] = matcher.is_accepting()
                request["actions_dropped_by_cut"] = len(whole.actions) - len(parser.actions)
        requests.append(request)
    sampled = sum(r["sampled_tokens"] for r in requests)
    return {"kind": kind, "wall_s": wall, "sampled_tokens": sampled, "tok_s": sampled / wall,
            "completion_tokens": sum(r["completion_tokens"] for r in requests), "engine_steps": len(probe.steps),
            "requests": requests, "steps": probe.steps, "mask_ms_calls": len(probe.mask_ms)}


def _emotion(tokenizer, fmt, forced: list[int], sampled: list[tuple[int, int]], first_step: int) -> dict:
    """Which sampled token made the emotion certain (fmt.parser(), fed token by token as the stream is) and
    at which engine step (from the run's first step)."""
    detok, parser = tokenizer.detokenizer(), fmt.parser()
    for token in forced:
        parser.push(detok.push(token))
    for k, (step, token) in enumerate(sampled, 1):
        parser.push(detok.push(token))
        if parser.emotion:
            return {"emotion": parser.emotion, "emotion_token": k, "emotion_step": step - first_step}
    return {"emotion": "", "emotion_token": None, "emotion_step": None}


async def _measure(model: Path, adapters: list[Path], text_tokens: int, rounds: int, device: str,
                   weights: str, warm: bool = False) -> dict:
    from sidecar.config import EngineConfig, ModelConfig
    from sidecar.engine.api import SamplingParams
    from sidecar.engine.base_model import load_base_model
    from sidecar.engine.engine import AsyncEngine

    n = len(adapters)
    engine = AsyncEngine(lambda: load_base_model(ModelConfig(model, weights, device)),
                         EngineConfig(max_batch=n, max_resident_adapters=n, max_waiting=max(64, n)))
    probe = _Probe(engine.core)
    refs = [engine.load_adapter(f"npc{i}", a, "1") for i, a in enumerate(adapters)]
    turns = npc_turns(engine.model.tokenizer, n, text_tokens)
    constrained = [t.constrained for t in turns]

    # Warm-up (not timed): kernels, adapters into their slots, the grammar path; and each constrained
    # reply's length, which the free turns then generate exactly (with `warm`, from a second run that finds
    # the personas cached, as the timed runs will: a cached prefix may round differently and flip a token).
    def lengths(run: dict) -> list:
        return [SamplingParams(max_tokens=max(1, q["sampled_tokens"]), ignore_eos=True) for q in run["requests"]]

    warm_run = await _run(engine, probe, turns, refs, constrained, "constrained", warm)
    free = lengths(warm_run)
    await _run(engine, probe, turns, refs, free, "free", warm)
    if warm:  # the lengths again, now that both kinds' prompts are cached as they will be in the timed runs
        warm_run = await _run(engine, probe, turns, refs, constrained, "constrained", warm)
        free = lengths(warm_run)

    # Greedy replies are the same every run as long as every step's batch is (cold, it is: the schedule is
    # fixed by the prompts). A warm prefill is short enough that a step may run before every turn is
    # submitted; a batch of another shape may round differently and flip a token. So the free turns always
    # take the lengths of the latest constrained run; the report shows both counts of every round.
    runs = []
    for r in range(rounds):
        order = ("free", "constrained") if r % 2 == 0 else ("constrained", "free")
        for kind in order:
            run = await _run(engine, probe, turns, refs, free if kind == "free" else constrained, kind, warm)
            runs.append({"round": r, **run})
            if kind == "constrained":
                free = lengths(run)
    await engine.shutdown()
    return {"n": n, "text_tokens": text_tokens, "warm_prefix_cache": warm,
            "prompt_tokens": [len(t.prompt) for t in turns], "grammar_example": turns[0].constrained.grammar,
            "max_tokens": [t.constrained.max_tokens for t in turns], "free_max_tokens": [p.max_tokens for p in free],
            "warmup_sampled": [r["sampled_tokens"] for r in warm_run["requests"]], "runs": runs}


def worker(model: Path, adapters_root: Path, n: int, text_tokens: int, rounds: int, device: str = "cpu",
           weights: str = "auto", warm: bool = False) -> dict:
    from sidecar.bench.multi_npc import _adapter_dirs
    from sidecar.bench.timing import peak_rss_mb

    result = asyncio.run(_measure(model, _adapter_dirs(adapters_root, n), text_tokens, rounds, device, weights, warm))
    return {**result, "rss_mb": peak_rss_mb()}


# --- summary ---------------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _step_parts(runs: list[dict], n: int, prefill: bool = False) -> dict:
    """Median (and p99) ms per part of the steps with all n rows decoding, without a prefill chunk (what one
    step of the batch costs, and for the constrained runs what the grammar adds to it) or with one."""
    keys = ("step_ms", "forward_ms", "prefill_ms", "mask_ms", "wait_ms", "apply_ms", "sample_ms", "accept_ms")
    steps = [s for run in runs for s in run["steps"]
             if (("prefill_tokens" in s) == prefill) and (prefill or s.get("decode_rows") == n)]
    out: dict = {"steps": len(steps)}
    for key in keys:
        values = [s.get(key, 0.0) for s in steps]
        out[key] = _pct(values, 0.5)
        out[key.replace("_ms", "_p99_ms")] = _pct(values, 0.99)
    return out


def summarize(data: dict) -> dict:
    """The figures the report states, from the runs (data["runs"]); added to data as data["summary"]."""
    runs, n = data["runs"], data["n"]
    by_round: dict[int, dict[str, dict]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["kind"]] = run
    rounds = []
    for r, pair in sorted(by_round.items()):
        if "free" in pair and "constrained" in pair:
            rounds.append({"round": r, "first": "free" if r % 2 == 0 else "constrained",
                           "free_tok_s": pair["free"]["tok_s"], "constrained_tok_s": pair["constrained"]["tok_s"],
                           "ratio": pair["constrained"]["tok_s"] / pair["free"]["tok_s"],
                           "free_tokens": pair["free"]["sampled_tokens"],
                           "constrained_tokens": pair["constrained"]["sampled_tokens"]})
    free = [run for run in runs if run["kind"] == "free"]
    constrained = [run for run in runs if run["kind"] == "constrained"]

    # The emotion against the first token: per NPC and round, the engine step at which the constrained
    # reply's emotion was certain, minus the step of the free reply's first token in the same round.
    emotion_tokens: Counter = Counter()
    after_free_first: Counter = Counter()
    after_own_first: Counter = Counter()
    emotion_ms, free_ttft_ms, missing = [], [], 0
    for pair in by_round.values():
        if "free" not in pair or "constrained" not in pair:
            continue
        for c, f in zip(pair["constrained"]["requests"], pair["free"]["requests"], strict=True):
            if c["emotion_step"] is None:
                missing += 1
                continue
            emotion_tokens[c["emotion_token"]] += 1
            after_free_first[c["emotion_step"] - f["first_token_step"]] += 1
            after_own_first[c["emotion_step"] - c["first_token_step"]] += 1
            if c["emotion_ms"] is not None:
                emotion_ms.append(c["emotion_ms"])
            free_ttft_ms.append(f["ttft_ms"])

    requests = [q for run in runs for q in run["requests"]]
    passes = Counter(q["prefill"]["completions"] for q in requests)
    computed_ok = all(q["prefill"]["tokens"] == q["prefill"]["prompt"] - q["prefill"]["cached"] for q in requests)

    def chunks(kind_runs: list[dict]) -> float:
        reqs = [q for run in kind_runs for q in run["requests"]]
        return sum(q["prefill"]["chunks"] for q in reqs) / max(1, len(reqs))

    def prefill_tokens(kind_runs: list[dict]) -> float:
        reqs = [q for run in kind_runs for q in run["requests"]]
        return sum(q["prefill"]["tokens"] for q in reqs) / max(1, len(reqs))

    replies = {tuple(tuple(q["sampled_ids"]) for q in run["requests"]) for run in constrained}
    parsed = [q["parsed"] for run in constrained for q in run["requests"]]
    ratios = [r["ratio"] for r in rounds]
    worst = max(after_free_first) if after_free_first else None
    step_free, step_constrained = _step_parts(free, n), _step_parts(constrained, n)
    prefill_free, prefill_constrained = _step_parts(free, n, prefill=True), _step_parts(constrained, n, prefill=True)
    summary = {
        "rounds": rounds,
        "free_tok_s_median": _pct([r["free_tok_s"] for r in rounds], 0.5),
        "constrained_tok_s_median": _pct([r["constrained_tok_s"] for r in rounds], 0.5),
        "ratio_median": _pct(ratios, 0.5), "ratio_min": min(ratios, default=None),
        "ratio_max": max(ratios, default=None),
        "emotion_token": {str(k): v for k, v in sorted(emotion_tokens.items())},
        "emotion_steps_after_free_first_token": {str(k): v for k, v in sorted(after_free_first.items())},
        "emotion_steps_after_own_first_token": {str(k): v for k, v in sorted(after_own_first.items())},
        "emotion_steps_after_free_first_token_max": worst, "replies_without_emotion": missing,
        "emotion_ms_median": _pct(emotion_ms, 0.5), "free_ttft_ms_median": _pct(free_ttft_ms, 0.5),
        "prefill_passes_per_reply": {str(k): v for k, v in sorted(passes.items())},
        "prefill_tokens_match_prompt": computed_ok,
        "prefill_chunks_per_reply": {"free": chunks(free), "constrained": chunks(constrained)},
        "prefill_tokens_per_reply": {"free": prefill_tokens(free), "constrained": prefill_tokens(constrained)},
        "constrained_replies_identical_across_runs": len(replies) == 1,
        "replies_with_actions": sum(1 for p in parsed if p["actions"]),
        "actions_taken": sum(len(p["actions"]) for p in parsed),
        "finish_reasons": dict(Counter(q["finish_reason"] for run in constrained for q in run["requests"])),
        "length_cut_but_complete": sum(1 for run in constrained for q in run["requests"] if q.get("complete_at_cut")),
        "actions_dropped_by_cut": sum(q.get("actions_dropped_by_cut", 0) for run in constrained
                                      for q in run["requests"]),
        "decode_step_ms": {"free": step_free, "constrained": step_constrained},
        "prefill_step_ms": {"free": prefill_free, "constrained": prefill_constrained},
        "submit_ms_median": {kind: _pct([q["submit_ms"] for run in kind_runs for q in run["requests"]], 0.5)
                             for kind, kind_runs in (("free", free), ("constrained", constrained))},
    }
    f_ms, c_ms = step_free.get("step_ms"), step_constrained.get("step_ms")
    summary["decode_step_ratio"] = f_ms / c_ms if f_ms and c_ms else None
    summary["targets"] = [
        {"target": f"N={n} constrained tokens/s >= {RATIO_TARGET}x free (median of {len(rounds)} rounds)",
         "value": f"{summary['ratio_median']:.3f}x" if ratios else "-",
         "met": (summary["ratio_median"] >= RATIO_TARGET) if ratios else None},
        {"target": "emotion certain <= 1 engine step after the free reply's first token",
         "value": f"at most {worst:+d} step(s)" if worst is not None else "-",
         "met": (worst <= 1 and missing == 0) if worst is not None else None},
        {"target": "one prefill per reply",
         "value": ", ".join(f"{v} replies: {k} prefill(s)" for k, v in sorted(passes.items())),
         "met": set(passes) == {1} and computed_ok},
    ]
    return summary


# --- report ------------------------------------------------------------------------------------------------


def _ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _dist(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"


_PARTS = (("whole step", "step_ms"), ("decode forward", "forward_ms"), ("prefill chunk forward", "prefill_ms"),
          ("masks, on the grammar thread (overlaps the forwards)", "mask_ms"),
          ("waiting for the masks after the forward", "wait_ms"), ("applying the masks to the logits", "apply_ms"),
          ("sampling (with the waiting and applying)", "sample_ms"),
          ("accepting the tokens (matchers' consume, events)", "accept_ms"))


def _parts_table(parts: dict) -> str:
    f, c = parts["free"], parts["constrained"]
    p99 = lambda key: key.replace("_ms", "_p99_ms")  # noqa: E731
    rows = [[name, _ms(f[key]), _ms(f[p99(key)]), _ms(c[key]), _ms(c[p99(key)])] for name, key in _PARTS
            if f[key] or c[key]]
    return markdown_table(["ms", "free p50", "free p99", "constrained p50", "constrained p99"], rows)


def _markdown(data: dict) -> str:
    s, m, n = data["summary"], data["machine"], data["n"]
    lines = [f"Constrained turns: {n} NPCs at once, each its own rank-{data['rank']} LoRA, greedy, text budget "
             f"{data['text_tokens']} tokens. The same turns free (no grammar; each NPC exactly as many tokens as its "
             "constrained reply) and under the turn grammar, alternating, on one engine; "
             + ("prefix cache kept: every persona cached by the warm-up runs. " if data.get("warm_prefix_cache")
                else "prefix cache emptied before every run (every persona cold). ")
             + f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} on {m['torch_threads']} thread(s), "
             f"{m['date']}.", ""]
    if data.get("command"):
        lines += [f"Command: `{data['command']}`", ""]
    rows = [[r["round"], r["first"], f"{r['free_tok_s']:.1f}", f"{r['constrained_tok_s']:.1f}", f"{r['ratio']:.3f}",
             f"{r['free_tokens']} / {r['constrained_tokens']}"] for r in s["rounds"]]
    rows.append(["**median**", "", f"**{s['free_tok_s_median']:.1f}**", f"**{s['constrained_tok_s_median']:.1f}**",
                 f"**{s['ratio_median']:.3f}**", ""])
    lines += [markdown_table(["round", "first", "free tok/s", "constrained tok/s", "constrained / free",
                              "tokens sampled (free / constrained)"], rows), "", targets_table(s["targets"]), ""]
    d, pf = s["decode_step_ms"], s["prefill_step_ms"]
    lines += [f"Decode steps with all {n} rows decoding and no prefill chunk (free {d['free']['steps']}, constrained "
              f"{d['constrained']['steps']} steps): free / constrained step time "
              f"{_ms(s['decode_step_ratio'], 3)}x.", "", _parts_table(d), "",
              f"Steps with a prefill chunk (free {pf['free']['steps']}, constrained {pf['constrained']['steps']}):", "",
              _parts_table(pf), ""]
    sub = s["submit_ms_median"]
    lines += [f"Emotion: certain after the reply's sampled token number {{{_dist(s['emotion_token'])}}} (token: "
              "replies); engine steps from the free reply's first token to it "
              f"{{{_dist(s['emotion_steps_after_free_first_token'])}}} (steps: replies), from the constrained "
              f"reply's own first token {{{_dist(s['emotion_steps_after_own_first_token'])}}}. Time to the emotion, "
              f"median {_ms(s['emotion_ms_median'], 0)} ms, against the free first token's "
              f"{_ms(s['free_ttft_ms_median'], 0)} ms. Replies without an emotion: {s['replies_without_emotion']}. "
              f"submit() (the grammar compiles in it) median {_ms(sub['constrained'])} ms constrained, "
              f"{_ms(sub['free'])} ms free.", ""]
    chunks, tokens = s["prefill_chunks_per_reply"], s["prefill_tokens_per_reply"]
    lines += [f"Prefill: passes per reply {{{_dist(s['prefill_passes_per_reply'])}}} (passes: replies); prompt tokens "
              "computed = prompt + the grammar's forced opening - cached, for every reply: "
              f"{s['prefill_tokens_match_prompt']}; per reply, chunks {chunks['free']:.2f} free, "
              f"{chunks['constrained']:.2f} constrained, tokens {tokens['free']:.1f} free, "
              f"{tokens['constrained']:.1f} constrained.", ""]
    replies = sum(s["finish_reasons"].values())
    lines += [f"Constrained replies: finish reasons {s['finish_reasons']}; {s['replies_with_actions']} of {replies} "
              f"took actions ({s['actions_taken']} in all); {s['length_cut_but_complete']} cut by max_tokens although "
              "each was a whole reply the grammar accepted as it stood, dropping "
              f"{s['actions_dropped_by_cut']} complete action(s); the same in every run (greedy): "
              f"{s['constrained_replies_identical_across_runs']}. Prompts {min(data['prompt_tokens'])}-"
              f"{max(data['prompt_tokens'])} tokens. Peak RSS {data['rss_mb']:.0f} MB.", ""]
    last = [run for run in data["runs"] if run["kind"] == "constrained"][-1]
    lines += ["Replies (the last constrained run):", ""]
    lines += [f"- NPC {q['npc']} ({q['finish_reason']}): `{json.dumps(q['text'], ensure_ascii=False)[1:-1][:200]}`"
              for q in last["requests"]]
    return "\n".join(lines).rstrip()


def _plot(path: Path, data: dict) -> None:
    plt = pyplot()
    s = data["summary"]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4.6))
    rounds = s["rounds"]
    xs = [r["round"] for r in rounds]
    left.plot(xs, [r["free_tok_s"] for r in rounds], marker="o", label="free")
    left.plot(xs, [r["constrained_tok_s"] for r in rounds], marker="o", label="constrained")
    for r in rounds:
        left.annotate(f"{r['ratio']:.2f}x", (r["round"], r["constrained_tok_s"]), textcoords="offset points",
                      xytext=(0, -14), ha="center", fontsize=8)
    left.set_xticks(xs)
    left.set_xlabel("round (ratio constrained / free under each)")
    left.set_ylabel("aggregate tokens/s")
    left.set_ylim(0, 1.15 * max([r["free_tok_s"] for r in rounds] + [r["constrained_tok_s"] for r in rounds] + [1]))
    left.legend()
    left.grid(alpha=0.3)

    # The step beyond its forward (which both kinds share): where the grammar's cost shows.
    parts = [("wait for masks", "wait_ms"), ("apply masks", "apply_ms"), ("sample", None),
             ("accept tokens", "accept_ms"), ("rest of the step", None)]
    kinds = ("free", "constrained")
    bottoms = [0.0, 0.0]
    for name, key in parts:
        values = []
        for k in kinds:
            d = {key: value or 0.0 for key, value in s["decode_step_ms"][k].items()}
            if key is not None:
                v = d[key]
            elif name == "sample":
                v = d["sample_ms"] - d["wait_ms"] - d["apply_ms"]
            else:
                v = d["step_ms"] - d["forward_ms"] - d["sample_ms"] - d["accept_ms"]
            values.append(max(0.0, v))
        mid.bar(kinds, values, bottom=bottoms, label=name)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    mask = s["decode_step_ms"]["constrained"].get("mask_ms") or 0.0
    mid.bar(["masks\n(grammar thread,\noverlapped)"], [mask], color="grey", label="compute masks")
    forward = [s["decode_step_ms"][k].get("forward_ms") or 0.0 for k in kinds]
    mid.set_title(f"decode forward itself: free {forward[0]:.1f} ms, constrained {forward[1]:.1f} ms", fontsize=9)
    mid.set_ylabel(f"ms per {data['n']}-row decode step, beyond the forward")
    mid.legend(fontsize=8)
    mid.grid(alpha=0.3, axis="y")

    dist = s["emotion_steps_after_free_first_token"]
    keys = sorted(int(k) for k in dist)
    right.bar([str(k) for k in keys], [dist[str(k)] for k in keys], color="tab:orange")
    right.set_xlabel("engine steps from the free reply's first token to the emotion")
    right.set_ylabel("replies (all rounds)")
    right.grid(alpha=0.3, axis="y")
    m = data["machine"]
    cache = "warm" if data.get("warm_prefix_cache") else "cold"
    fig.suptitle(f"Constrained turns, N={data['n']} NPCs with distinct adapters, {cache} prefix cache, "
                 f"{m['cores']}-core CPU ({m['torch_threads']} torch thread(s)): median ratio {s['ratio_median']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- driver --------------------------------------------------------------------------------------------------


def _compact(data: dict) -> None:
    """What the JSON keeps of the runs (the summary has the figures of all of them): every request's figures,
    and of the last round's two runs also each reply's text and token ids and every step's timings, one
    list per field."""
    last = max(run["round"] for run in data["runs"])
    for run in data["runs"]:
        steps = run.pop("steps")
        if run["round"] == last:
            fields = sorted({key for step in steps for key in step})
            run["steps"] = {key: [round(step.get(key, 0), 3) for step in steps] for key in fields}
        for q in run["requests"]:
            for key in ("ttft_ms", "emotion_ms", "submit_ms"):
                if q.get(key) is not None:
                    q[key] = round(q[key], 2)
            if run["round"] != last:
                for key in ("text", "sampled_ids", "parsed"):
                    q.pop(key, None)


def run_constrained_bench(cfg: ConstrainedConfig, command: str = "") -> dict:
    """Writes the random adapters (multi-npc's), runs the measurement in a subprocess, writes the report."""
    from sidecar.bench.multi_npc import MultiNpcConfig, prepare

    adapters = prepare(MultiNpcConfig(model=cfg.model, ns=(cfg.n,), peers=(), workdir=cfg.workdir, rank=cfg.rank,
                                      device=cfg.device), cfg.model)
    cmd = [sys.executable, "-m", "sidecar.bench.constrained", "--worker", "--model", str(cfg.model), "--adapters",
           str(adapters), "--n", str(cfg.n), "--tokens", str(cfg.text_tokens), "--rounds", str(cfg.rounds),
           "--device", cfg.device, "--weights", cfg.weights, *(["--warm"] if cfg.warm else [])]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.run_timeout)
    if run.returncode != 0:
        raise RuntimeError(f"the constrained bench's measurement failed (exit {run.returncode}):\n"
                           + "\n".join(run.stderr.strip().splitlines()[-20:]))
    data = {"scenario": "constrained", "model": str(cfg.model), "rank": cfg.rank, "adapter_std": ADAPTER_STD,
            "device": cfg.device, "weights": cfg.weights, "command": command, "machine": machine_description(),
            **json.loads(run.stdout.strip().splitlines()[-1])}
    data["summary"] = summarize(data)
    _compact(data)
    if cfg.json_path:
        cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_path.write_text(to_json(data))
    write_report(cfg.out_dir, cfg.report_name, data, _markdown(data), lambda path: _plot(path, data))
    print(_markdown(data))
    return data


def main(argv: list[str] | None = None) -> int:
    """`python -m sidecar.bench.constrained [flags]`: the whole bench (what `npc bench --scenario constrained`
    runs); with --worker, only the measurement, one JSON line on stdout (the bench's subprocess)."""
    p = argparse.ArgumentParser(prog="python -m sidecar.bench.constrained", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="GGUF file or Hugging Face folder (default: $NPC_MODEL, else the embedded model)")
    p.add_argument("--n", type=int, default=8, help="NPCs talking at once, each its own adapter (default 8)")
    p.add_argument("--tokens", type=int, default=64, help="each turn's text budget in tokens (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of one free and one constrained run (default 5)")
    p.add_argument("--out", default="docs/bench", help="folder for constrained.{json,md,png}")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--workdir", default="/tmp/npc-bench-multi", help="where the random adapters are kept")
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", default="auto")
    p.add_argument("--run-timeout", type=float, help="seconds the measurement may take")
    p.add_argument("--warm", action="store_true", help="keep every persona in the prefix cache (the warm-up runs fill "
                                                       "it) instead of emptying it before each run; report *_warm.*")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--adapters", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from sidecar.config import resolve_model_path

    model = resolve_model_path(a.model)
    if a.worker:
        print(json.dumps(worker(model, Path(a.adapters), a.n, a.tokens, a.rounds, a.device, a.weights, a.warm)))
        return 0
    from sidecar.figures import require_matplotlib

    require_matplotlib()
    cfg = ConstrainedConfig(model=model, n=a.n, text_tokens=a.tokens, rounds=a.rounds, out_dir=Path(a.out),
                            json_path=Path(a.json) if a.json else None, workdir=Path(a.workdir), device=a.device,
                            weights=a.weights, run_timeout=a.run_timeout, warm=a.warm)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    run_constrained_bench(cfg, command=threads + " ".join(["python -m sidecar.bench.constrained",
                                                           *(argv or sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
