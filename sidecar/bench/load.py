"""`npc bench --scenario load`: many players talking at once, for minutes, to a real `npc serve`.

`clients` players (64 by default) talk back to back to every character of ./characters (copied to
a temp folder first): a character and a player line at random, half the time in the player's own
session so that history grows. Each reply is read to its end under a deadline. After `warmup`
seconds, `duration` seconds are measured: every request that ends inside that window counts.

Figures: requests completed, errors by status, completion tokens/s, time to first token and
inter-token latency (the gaps between consecutive deltas, as the client sees them) p50/p90/p99,
fairness (ITL p99 / p50), and the server's resident memory (VmRSS, sampled every second) right
after the warm-up against the end of the window. Then, with the players still talking, an
overflow probe fires max_batch + max_waiting + 32 extra calls at once: the ones that do not fit
must get RESOURCE_EXHAUSTED, promptly.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sidecar.bench.grpc_load import (
    PLAYER_LINES,
    ServerMonitor,
    TalkRecord,
    client_loop,
    copy_characters,
    latency_summary,
    optional_flags,
    percentile,
    status_counts,
    talk,
    wait_idle,
)
from sidecar.bench.report import machine_description, markdown_table, targets_table, update_section, write_report
from sidecar.bench.server_process import BenchServer
from sidecar.client import NpcClient
from sidecar.figures import pyplot
from sidecar.pb.npc.v1 import dialogue_pb2 as pb

RECORDED = {"clients": 64, "duration": 300.0, "warmup": 30.0}  # below these, the report says "smoke run"
PROBE_WAIT_S = 2.0  # a burst call with no answer by then is queued (accepted); it is cancelled
ITL_BINS_MS = [0.0, *np.geomspace(0.1, 60_000, 61).round(3).tolist()]  # the histogram kept in the JSON


@dataclass(frozen=True)
class LoadConfig:
    characters: Path = Path("characters")
    clients: int = 64
    duration: float = 300.0
    warmup: float = 30.0
    deadline: float = 120.0  # per reply: a hang shows up as DEADLINE_EXCEEDED instead of a stuck client
    max_tokens: int = 0  # 0: each character's own max_tokens
    seed: int = 0
    out_dir: Path = Path("docs/bench")
    report: Path = Path("docs/reliability.md")

    def command(self) -> str:
        """The `npc bench` command line that reproduces this run."""
        parts = [f"npc bench --scenario load --clients {self.clients} --duration {self.duration:g} "
                 f"--warmup {self.warmup:g}"]
        return " ".join(parts + optional_flags(self, LoadConfig))

    @property
    def smoke(self) -> bool:
        return any(getattr(self, name) < value for name, value in RECORDED.items())


def run_load_bench(cfg: LoadConfig) -> dict:
    # Taken before the run (its date is the start). The load average says whether the machine was
    # quiet: other processes on the same cores slow the server far more than their share.
    machine = {**machine_description(), "load_average_1min": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="npc-bench-load-") as tmp:
        root = Path(tmp) / "characters"
        root.mkdir()
        ids = copy_characters(cfg.characters, root)
        server = BenchServer.start(root, Path(tmp) / "server.log")
        try:
            data = asyncio.run(_measure(cfg, server, ids))
        finally:
            exit_code = server.stop()
        problems = server.log_records("warning", "error", "critical")
        probe = data["overflow_probe"]
        probe["server_refusals_logged_over_ms"] = _refusal_span_ms(server, probe["resource_exhausted"])
    data.update(server_exit_code=exit_code, server_log_problems=len(problems),
                server_log_problem_samples=[p.get("event", "") for p in problems[:10]])
    data = {"scenario": "load", "command": cfg.command(), "smoke": cfg.smoke, "machine": machine,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()}, **data}
    data["targets"] = _targets(data)
    write_report(cfg.out_dir, "load", data, _markdown(data, ""), lambda path: _plot(path, data))
    link = os.path.relpath(cfg.out_dir, cfg.report.parent) + "/"
    update_section(cfg.report, "load", _markdown(data, link), "Reliability")
    print(_markdown(data, link))
    return data


async def _measure(cfg: LoadConfig, server: BenchServer, ids: list[str]) -> dict:
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    async with NpcClient(server.address) as client, NpcClient(server.address) as probe_client:
        await client.wait_ready(10)
        info = await client.server_info()
        monitor = ServerMonitor(server.address, server.pid, t0)
        monitor.start()
        stop, records = asyncio.Event(), []
        options = pb.GenerationOptions(max_tokens=cfg.max_tokens) if cfg.max_tokens else None
        # One channel for every player, as a game has one connection to its sidecar.
        loops = [asyncio.create_task(client_loop(client, ids, stop, records, random.Random(rng.random()),
                                                 f"player-{i}", 0.5, options, cfg.deadline))
                 for i in range(cfg.clients)]
        total = cfg.warmup + cfg.duration
        with tqdm(total=round(total), unit="s", desc=f"load, {cfg.clients} clients") as bar:
            while (elapsed := time.perf_counter() - t0) < total:
                await asyncio.sleep(min(1.0, total - elapsed))
                bar.update(min(round(time.perf_counter() - t0), round(total)) - bar.n)
                rss = monitor.samples[-1].rss_mb if monitor.samples else None
                bar.set_postfix(replies=sum(r.ok for r in records), errors=sum(not r.ok for r in records),
                                rss_mb=f"{rss:.0f}" if rss else "?")
        window = (t0 + cfg.warmup, time.perf_counter())
        probe = await _overflow_probe(probe_client, ids, info, rng)
        probe_end = time.perf_counter()
        stop.set()
        for task in loops:  # replies still streaming are not part of any figure: cancel them
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        idle_s, _ = await wait_idle(client, 10.0)
        await monitor.stop()

    measured = [r for r in records if window[0] <= r.ended_at <= window[1]]
    during_probe = [r for r in records if window[1] < r.ended_at <= probe_end]
    seconds = window[1] - window[0]
    span = min(5.0, cfg.duration / 4)  # RSS: median of the samples over a few seconds, not one sample
    rss_start = monitor.rss_between(cfg.warmup, cfg.warmup + span)
    rss_end = monitor.rss_between(window[1] - t0 - span, window[1] - t0)
    # Growth over the second half alone tells a leak (it goes on) from caches filling up (they stop).
    middle = cfg.warmup + (window[1] - window[0]) / 2
    rss_middle = monitor.rss_between(middle - span, middle)
    rss_values = [s.rss_mb for s in monitor.samples if s.rss_mb is not None]
    prefix_start = monitor.rss_between(cfg.warmup, cfg.warmup + span, "prefix_cache_mb")
    prefix_end = monitor.rss_between(window[1] - t0 - span, window[1] - t0, "prefix_cache_mb")
    ok = [r for r in measured if r.ok]
    itl = [g for r in measured for g in r.gaps_ms]
    ttft = [r.ttft_ms for r in measured if r.ttft_ms is not None]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "server": {"max_batch": info.max_batch, "max_waiting": info.max_waiting, "weights": info.weights,
                   "model": info.model, "characters": ids},
        "window_s": round(seconds, 1),
        "requests_completed": len(ok),
        "requests_per_s": round(len(ok) / seconds, 2),
        "errors": status_counts(measured),
        "error_samples": sorted({f"{r.outcome}: {r.message or r.problem}" for r in measured if not r.ok})[:10],
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "finish_reasons": {f: sum(r.finish == f for r in ok) for f in ("STOP", "LENGTH")},
        **latency_summary(ttft, "ttft"),
        **latency_summary(itl, "itl"),
        "fairness_itl_p99_over_p50": round(percentile(itl, 0.99) / percentile(itl, 0.5), 2) if itl else None,
        "history_turns_max": max((r.history_turns for r in measured), default=0),
        "prompt_tokens_p50": round(percentile([r.prompt_tokens for r in ok], 0.5)) if ok else None,
        "by_character": {cid: {"completed": sum(r.character == cid for r in ok),
                               **latency_summary([g for r in measured if r.character == cid for g in r.gaps_ms],
                                                 "itl", (0.5, 0.99))} for cid in ids},
        "rss_after_warmup_mb": rss_start,
        "rss_end_mb": rss_end,
        "rss_peak_mb": round(max(rss_values), 1) if rss_values else None,
        "rss_growth_pct": round((rss_end - rss_start) / rss_start * 100, 2) if rss_start and rss_end else None,
        "rss_middle_mb": rss_middle,
        "prefix_cache_after_warmup_mb": prefix_start,
        "prefix_cache_end_mb": prefix_end,
        # What RSS grew by beyond the prefix cache filling up (it is bounded by design)
        "rss_growth_beyond_prefix_cache_pct": round((rss_end - rss_start - (prefix_end - prefix_start))
                                                    / rss_start * 100, 2)
        if rss_start and rss_end and prefix_start is not None and prefix_end is not None else None,
        "rss_growth_second_half_pct": round((rss_end - rss_middle) / rss_middle * 100, 2)
        if rss_middle and rss_end else None,
        "overflow_probe": probe,
        "outcomes_of_players_during_probe": status_counts(during_probe),
        "idle_after_stop_s": idle_s,
        "itl_histogram": {"edges_ms": ITL_BINS_MS, "counts": np.histogram(itl, ITL_BINS_MS)[0].tolist()},
        "timeline": monitor.series(),
        "warmup_s": cfg.warmup,
        "probe_at_s": round(window[1] - t0, 1),
    }


async def _overflow_probe(client: NpcClient, ids: list[str], info: pb.ServerInfo, rng: random.Random) -> dict:
    """max_batch + max_waiting + 32 calls at once on top of the players: more than can ever fit."""
    burst = info.max_batch + info.max_waiting + 32
    tasks = [asyncio.create_task(talk(client, ids[i % len(ids)], rng.choice(PLAYER_LINES), cancel_after=0,
                                      timeout=30.0)) for i in range(burst)]
    done, pending = await asyncio.wait(tasks, timeout=PROBE_WAIT_S)
    for task in pending:  # accepted and still queued: not needed any more
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    records: list[TalkRecord] = [t.result() for t in done]
    refused = [r for r in records if r.status == "RESOURCE_EXHAUSTED"]
    started = [r for r in records if r.cancelled_by_client or r.ok]
    others = [r for r in records if r not in refused and r not in started]
    sent = [r.started_at for r in records] or [0.0]
    return {"burst": burst, "sent_over_ms": round((max(sent) - min(sent)) * 1000, 1),
            "resource_exhausted": len(refused), "accepted_started": len(started), "accepted_queued": len(pending),
            "other_outcomes": status_counts(others),
            **latency_summary([(r.ended_at - r.started_at) * 1000 for r in refused], "refusal", (0.5,))}


def _refusal_span_ms(server: BenchServer, count: int) -> float | None:
    """First to count-th RESOURCE_EXHAUSTED in the server's log: how long the server itself took to
    refuse the burst, to tell its share of the refusal latency from the client's. The burst's come
    first: its calls arrive within milliseconds, players retry only after a 100-200 ms backoff."""
    stamps = sorted(datetime.fromisoformat(r["timestamp"]) for r in server.log_records("info")
                    if r.get("event") == "refused" and r.get("code") == "RESOURCE_EXHAUSTED" and "timestamp" in r)
    return round((stamps[count - 1] - stamps[0]).total_seconds() * 1000, 1) if count and len(stamps) >= count else None


def _targets(d: dict) -> list[dict]:
    p = d["overflow_probe"]
    growth, fair, refusal = d["rss_growth_pct"], d["fairness_itl_p99_over_p50"], p["refusal_max_ms"]
    errors = ", ".join(f"{k} {v}" for k, v in d["errors"].items()) or "0"
    return [
        {"target": "errors during the window: 0", "value": errors, "met": not d["errors"]},
        {"target": "fairness, ITL p99 / p50 <= 5", "value": fair, "met": fair is not None and fair <= 5},
        {"target": "server RSS growth after warm-up <= 5%", "value": f"{growth}%",
         "met": growth is not None and growth <= 5},
        {"target": "overflow: calls that do not fit get RESOURCE_EXHAUSTED (no other error)",
         "value": f"{p['resource_exhausted']} of {p['burst']}; other: {p['other_outcomes'] or 'none'}",
         "met": p["resource_exhausted"] > 0 and not p["other_outcomes"]},
        {"target": "overflow: RESOURCE_EXHAUSTED promptly, max < 100 ms", "value": f"{refusal} ms",
         "met": refusal is not None and refusal < 100},
        {"target": "idle (0 active, 0 waiting) within 10 s of the players stopping",
         "value": f"{d['idle_after_stop_s']} s" if d["idle_after_stop_s"] is not None else "not idle",
         "met": d["idle_after_stop_s"] is not None},
        {"target": "server exits 0 on SIGTERM, no warning or error in its log",
         "value": f"exit {d['server_exit_code']}, {d['server_log_problems']} log problem(s)",
         "met": d["server_exit_code"] == 0 and d["server_log_problems"] == 0},
    ]


def _ms(d: dict, name: str, qs: tuple[str, ...] = ("p50", "p90", "p99")) -> str:
    return " / ".join(f"{d[f'{name}_{q}_ms']}" for q in qs) + " ms"


def _markdown(d: dict, link: str) -> str:
    m, p, s = d["machine"], d["overflow_probe"], d["server"]
    c = d["config"]
    text = "## Sustained load (`--scenario load`)\n\n"
    if d["smoke"]:
        text += ("> **Smoke run** (shorter or fewer clients than the recorded run, on a shared machine): it checks "
                 "the harness; its figures are not the recorded ones.\n\n")
    text += (f"Command: `{d['command']}`  \nMachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
             f"load average {m['load_average_1min']} at the start; run of {m['date']}.\n\n"
             f"{c['clients']} clients on one gRPC channel talk back to back to {len(s['characters'])} characters "
             f"({', '.join(s['characters'])}; {s['model']} {s['weights']}, one LoRA each; `npc serve` defaults: "
             f"max_batch {s['max_batch']}, max_waiting {s['max_waiting']}), half of the lines in the player's "
             f"session (history up to {d['history_turns_max']} turns in the prompt). Every request that ended in "
             f"the {d['window_s']} s after a {c['warmup']:g} s warm-up counts; latencies are client-side.\n\n")
    rows = [
        ["requests completed", f"{d['requests_completed']} ({d['requests_per_s']}/s)"],
        ["errors", ", ".join(f"{k}: {v}" for k, v in d["errors"].items()) or "none"],
        ["completion tokens/s (all clients)", d["tokens_per_s"]],
        ["time to first token p50 / p90 / p99", _ms(d, "ttft")],
        ["inter-token latency p50 / p90 / p99 / max", _ms(d, "itl", ("p50", "p90", "p99", "max"))],
        ["fairness: ITL p99 / p50", d["fairness_itl_p99_over_p50"]],
        ["server RSS after warm-up -> middle -> end (peak)",
         f"{d['rss_after_warmup_mb']} -> {d['rss_middle_mb']} -> {d['rss_end_mb']} MB ({d['rss_growth_pct']:+}%; "
         f"second half {d['rss_growth_second_half_pct']:+}%; peak {d['rss_peak_mb']})"
         if d["rss_growth_pct"] is not None and d["rss_growth_second_half_pct"] is not None else "not measured"],
        ["prefix cache (bounded K/V reuse) after warm-up -> end; RSS growth beyond it",
         f"{d['prefix_cache_after_warmup_mb']} -> {d['prefix_cache_end_mb']} MB; "
         f"{d['rss_growth_beyond_prefix_cache_pct']:+}%" if d["rss_growth_beyond_prefix_cache_pct"] is not None
         else "not measured"],
        [f"overflow probe: {p['burst']} extra calls at once (sent over {p['sent_over_ms']} ms)",
         f"{p['resource_exhausted']} RESOURCE_EXHAUSTED in p50 {p['refusal_p50_ms']} / max {p['refusal_max_ms']} ms "
         f"(the server logged them over {p['server_refusals_logged_over_ms']} ms); "
         f"{p['accepted_started'] + p['accepted_queued']} accepted"],
        ["players' own calls during the probe", ", ".join(f"{k}: {v}" for k, v in
                                                          d["outcomes_of_players_during_probe"].items()) or "all OK"],
        ["idle after the players stopped", f"{d['idle_after_stop_s']} s"],
    ]
    text += markdown_table(["figure", "value"], rows) + "\n\n" + targets_table(d["targets"])
    text += f"\n\n![load: ITL distribution, server RSS and queue over time]({link}load.png) ([JSON]({link}load.json))"
    return text


def _plot(path: Path, d: dict) -> None:
    plt = pyplot()

    fig, (hist, rss, queue) = plt.subplots(1, 3, figsize=(15, 4.2))
    edges, counts = d["itl_histogram"]["edges_ms"], d["itl_histogram"]["counts"]
    hist.stairs(counts, edges, fill=True, alpha=0.6, label="deltas")
    hist.set_xscale("log")
    hist.set_xlim(left=0.1)
    hist.set_xlabel("inter-token latency (ms, client-side)")
    hist.set_ylabel("gaps")
    cdf = hist.twinx()
    cdf.plot(edges[1:], np.cumsum(counts) / max(1, sum(counts)), color="C1", label="CDF")
    cdf.set_ylim(0, 1.02)
    cdf.set_ylabel("cumulative share")
    for q, height in (("p50", 0.95), ("p99", 0.85)):
        if d[f"itl_{q}_ms"]:
            hist.axvline(d[f"itl_{q}_ms"], color="k", ls=":", lw=1)
            hist.text(d[f"itl_{q}_ms"], hist.get_ylim()[1] * height, f" {q}", fontsize=8)
    hist.set_title("ITL over the measured window")
    t = d["timeline"]
    rss.plot(t["t_s"], t["rss_mb"], color="C2")
    rss.set_xlabel("seconds since start")
    rss.set_ylabel("server VmRSS (MB)")
    rss.set_title("server memory")
    queue.plot(t["t_s"], t["active_sequences"], label="active sequences")
    queue.plot(t["t_s"], t["waiting_requests"], label="waiting requests")
    queue.set_xlabel("seconds since start")
    queue.set_title("server queue (GetServerInfo, 1/s)")
    queue.legend(loc="upper left", fontsize=8)
    for ax in (rss, queue):
        ax.axvspan(0, d["warmup_s"], color="grey", alpha=0.15, label="warm-up")
        ax.axvline(d["probe_at_s"], color="C3", ls="--", lw=1)
        ax.text(d["probe_at_s"], ax.get_ylim()[1], " overflow probe", color="C3", fontsize=8, va="top")
        ax.grid(alpha=0.3)
    fig.suptitle(f"npc bench --scenario load: {d['config']['clients']} clients, {d['window_s']} s measured"
                 + (" (smoke run)" if d["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
