"""`npc bench --scenario faults`: a real `npc serve` under load while things go wrong, in figures.

The pass / fail checks of the same faults, at a small scale, are tests (tests/test_server_reliability.py);
this scenario runs them at the recorded scale and reports what it measured, without a verdict. One
server for all steps, started with `--grace G` and `--session-store FILE`:
  a) `disconnects` clients (50 at a time) hang up mid-reply: after 0-3 deltas, or at a random
     moment that may find them still queued. Figures: how soon the server is idle again (0 active,
     0 waiting), whether it still answers, and its idle RSS after each batch (a leak keeps growing;
     caches filling up stop: see _step_disconnects).
  b) one character's character.yaml is edited every 2 s (persona text; rewritten atomically and
     in place, alternately) while `clients` players talk to it and the others: failed replies,
     versions seen against versions written, what ListCharacters said in between.
  c) a character's adapter_model.safetensors is overwritten with random bytes, then replaced by a
     truncated copy, then restored, under the same load: failed replies, replies not from the last
     good version, and how soon (and how) ListCharacters showed each phase.
  d) SIGTERM under load: replies in flight that finished within the grace period, late or were
     cancelled, the exit code and time; then a server restarted on the same session store is asked
     for every turn the clients saw finish, in every step (missing, extra, out of order).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from tqdm import tqdm

from sidecar.bench.grpc_load import (
    PLAYER_LINES,
    ServerMonitor,
    TalkRecord,
    client_loop,
    copy_characters,
    optional_flags,
    percentile,
    rss_mb,
    status_counts,
    talk,
    wait_idle,
)
from sidecar.bench.report import machine_description, markdown_table, update_section, write_report
from sidecar.bench.server_process import BenchServer
from sidecar.client import NpcClient
from sidecar.dialogue.characters import load_character
from sidecar.figures import pyplot
from sidecar.pb.npc.v1 import dialogue_pb2 as pb

RECORDED = {"clients": 16, "duration": 60.0, "disconnects": 1000}  # below these, the report says "smoke run"
DISCONNECT_BATCH = 50
EDIT_EVERY_S = 2.0
RELOAD_TIMEOUT_S = 5.0  # the server rescans every 0.5 s: a change shows in ListCharacters well within this
IDLE_TIMEOUT_S = 30.0  # step a waits this long at most for the server to be idle again
EXIT_TIMEOUT_S = 30.0  # step d: waited for beyond the grace before the exit counts as a hang


@dataclass(frozen=True)
class FaultsConfig:
    characters: Path = Path("characters")
    clients: int = 16  # players talking during steps b, c and d
    duration: float = 60.0  # seconds of steps b, c and d together (40% / 40% / 20%)
    disconnects: int = 1000
    grace: float = 1.0  # short enough that some replies in flight finish and some are cancelled
    deadline: float = 120.0
    max_tokens: int = 0  # 0: each character's own max_tokens
    seed: int = 0
    out_dir: Path = Path("docs/bench")
    report: Path = Path("docs/reliability.md")

    def command(self) -> str:
        parts = [f"npc bench --scenario faults --clients {self.clients} --duration {self.duration:g} "
                 f"--disconnects {self.disconnects} --grace {self.grace:g}"]
        return " ".join(parts + optional_flags(self, FaultsConfig))

    @property
    def smoke(self) -> bool:
        return any(getattr(self, name) < value for name, value in RECORDED.items())

    @property
    def options(self) -> pb.GenerationOptions | None:
        return pb.GenerationOptions(max_tokens=self.max_tokens) if self.max_tokens else None


@dataclass
class Run:
    """What every step shares: the server, its folder, a client, the monitor and every record."""

    cfg: FaultsConfig
    server: BenchServer
    root: Path  # the copied characters
    ids: list[str]
    client: NpcClient
    monitor: ServerMonitor
    rng: random.Random
    t0: float
    records: list[TalkRecord]  # every Talk of every step: step d looks for their sessions
    store: Path  # the server's --session-store

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 2)


def run_faults_bench(cfg: FaultsConfig) -> dict:
    # Taken before the run (its date is the start). The load average says whether the machine was
    # quiet: other processes on the same cores slow the server far more than their share.
    machine = {**machine_description(), "load_average_1min": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="npc-bench-faults-") as tmp:
        root, store = Path(tmp) / "characters", Path(tmp) / "sessions.jsonl"
        root.mkdir()
        ids = copy_characters(cfg.characters, root)
        server = BenchServer.start(root, Path(tmp) / "server.log", "--grace", f"{cfg.grace:g}", "--session-store",
                                   str(store))
        try:
            data = asyncio.run(_run(cfg, server, root, ids, store))
        finally:
            server.stop()
        errors, warnings = server.log_records("error", "critical"), server.log_records("warning")
    data = {"scenario": "faults", "command": cfg.command(), "smoke": cfg.smoke, "machine": machine,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()}, **data,
            "server_log_errors": len(errors), "server_log_error_samples": [e.get("event", "") for e in errors[:10]],
            "server_log_warnings": len(warnings)}
    write_report(cfg.out_dir, "faults", data, _markdown(data, ""), lambda path: _plot(path, data))
    link = os.path.relpath(cfg.out_dir, cfg.report.parent) + "/"
    update_section(cfg.report, "faults", _markdown(data, link), "Reliability")
    print(_markdown(data, link))
    return data


async def _run(cfg: FaultsConfig, server: BenchServer, root: Path, ids: list[str], store: Path) -> dict:
    t0 = time.perf_counter()
    async with NpcClient(server.address) as client:
        await client.wait_ready(10)
        monitor = ServerMonitor(server.address, server.pid, t0)
        monitor.start()
        run = Run(cfg, server, root, ids, client, monitor, random.Random(cfg.seed), t0, [], store)
        warm = await _warm_up(run)
        steps = []
        for step in (_step_disconnects, _step_edits, _step_adapter, _step_sigterm):
            start = run.now()
            result = await step(run)
            steps.append({**result, "span_s": [start, run.now()]})
            tqdm.write(f"{result['step']}) {result['name']}: {result['summary']}")
        await monitor.stop()
    return {"warm_up": warm, "steps": steps, "timeline": monitor.series()}


async def _warm_up(run: Run) -> dict:
    """One reply per character, so that no step pays for a first adapter load or a cold persona."""
    run.records += await asyncio.gather(*[talk(run.client, cid, "Hello there.", timeout=run.cfg.deadline,
                                               options=pb.GenerationOptions(max_tokens=8)) for cid in run.ids])
    return {"replies": len(run.records), "failed": status_counts(run.records)}


# --- a) disconnects ------------------------------------------------------------------------------


async def _hang_up_at(run: Run, character: str, line: str, session_id: str, delay: float) -> TalkRecord:
    """A player who closes the game `delay` seconds into the call, whatever it has received by then."""
    started = time.perf_counter()
    task = asyncio.create_task(talk(run.client, character, line, session_id, run.cfg.options, run.cfg.deadline))
    done, _ = await asyncio.wait([task], timeout=delay)
    if done:
        return task.result()  # it ended first
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return TalkRecord(character, line, session_id, started, time.perf_counter(), status="CANCELLED",
                      cancelled_by_client=True)


async def _idle_rss(run: Run) -> float | None:
    """Median of a few samples: RSS of an idle server."""
    values = []
    for _ in range(3):
        values.append(rss_mb(run.server.pid))
        await asyncio.sleep(0.25)
    values = [v for v in values if v is not None]
    return round(percentile(values, 0.5), 1) if values else None


async def _step_disconnects(run: Run) -> dict:
    n = run.cfg.disconnects
    await wait_idle(run.client, 30.0)
    rss_before = await _idle_rss(run)
    records, rss_per_batch = [], []
    start = time.perf_counter()
    with tqdm(total=n, desc="a) disconnects", unit="client") as bar:
        for first in range(0, n, DISCONNECT_BATCH):
            calls = []
            for slot in range(min(DISCONNECT_BATCH, n - first)):
                character, line = run.rng.choice(run.ids), run.rng.choice(PLAYER_LINES)
                session = f"drop-{slot}"  # one call per slot at a time: the session's turn order is known
                if run.rng.random() < 0.2:  # hangs up at any moment, maybe while still queued
                    calls.append(_hang_up_at(run, character, line, session, run.rng.uniform(0.0, 0.5)))
                else:  # hangs up after 0-3 deltas (0: right after Started)
                    calls.append(talk(run.client, character, line, session, run.cfg.options, run.cfg.deadline,
                                      cancel_after=run.rng.randint(0, 3)))
            records += await asyncio.gather(*calls)
            rss_per_batch.append(rss_mb(run.server.pid))  # every call of the batch has ended: idle again
            bar.update(len(calls))
    storm_s = time.perf_counter() - start
    idle_s, info = await wait_idle(run.client, IDLE_TIMEOUT_S)
    rss_after = await _idle_rss(run)
    check = await talk(run.client, run.ids[0], "Are you still there?", options=pb.GenerationOptions(max_tokens=8),
                       timeout=run.cfg.deadline)
    run.records += [*records, check]
    hung_up = sum(r.cancelled_by_client for r in records)
    unexpected = status_counts([r for r in records if not r.cancelled_by_client])
    # Memory: RSS grows at first whatever happens (the prefix cache keeps up to 256 MB of prompt K/V
    # on purpose, the allocator settles), so a leak is growth that goes on: the idle RSS after the
    # second half of the clients against after the first half.
    half = rss_per_batch[len(rss_per_batch) // 2 - 1] if len(rss_per_batch) >= 2 else rss_before
    growth = round((rss_after - half) / half * 100, 2) if half and rss_after else None
    return {
        "step": "a", "name": f"{n} clients hang up mid-reply",
        "figures": {
            "clients": n, "concurrent": DISCONNECT_BATCH, "storm_s": round(storm_s, 1), "hung_up": hung_up,
            "finished_before_hanging_up": sum(r.ok for r in records), "unexpected_outcomes": unexpected,
            "idle_after_s": idle_s, "active_sequences_after": info.active_sequences if info else None,
            "waiting_requests_after": info.waiting_requests if info else None,
            "rss_idle_before_mb": rss_before, "rss_after_half_mb": round(half, 1) if half else None,
            "rss_idle_after_mb": rss_after, "rss_growth_second_half_pct": growth,
            "rss_after_each_batch_mb": [round(v, 1) if v else None for v in rss_per_batch],
            "server_answers_after": check.outcome,
            "batch_rows_in_use_after": info.batch_rows_in_use if info else None,
            "kv_cache_mb_after": round(info.kv_cache_bytes / 2**20, 1) if info else None,
        },
        "summary": (f"{hung_up} hung up ({sum(r.ok for r in records)} finished first); idle after "
                    f"{idle_s if idle_s is not None else f'>{IDLE_TIMEOUT_S:g}'} s "
                    f"(active {info.active_sequences if info else '?'}, "
                    f"waiting {info.waiting_requests if info else '?'}); idle RSS {rss_before} MB before, "
                    f"{round(half, 1) if half else '?'} after half of the clients, {rss_after} after all "
                    f"({'?' if growth is None else f'{growth:+}'}% over the second half); "
                    f"unexpected: {_counts(unexpected)}"),
    }

# --- b) character.yaml edited under load ------------------------------------------------------


class _Players:
    """`clients` players for the duration of a step: half talk only to `focus`, half to everyone."""

    def __init__(self, run: Run, focus: str, prefix: str, session_share: float = 0.5):
        self.stop, self.records = asyncio.Event(), []
        self.tasks = [asyncio.create_task(client_loop(
            run.client, [focus] if i % 2 == 0 else run.ids, self.stop, self.records,
            random.Random(run.rng.random()), f"{prefix}-{i}", session_share, run.cfg.options, run.cfg.deadline))
            for i in range(run.cfg.clients)]

    async def finish(self, run: Run) -> list[TalkRecord]:
        """Lets every player finish the reply it is reading, then stops."""
        self.stop.set()
        await asyncio.gather(*self.tasks)
        run.records.extend(self.records)
        return self.records


async def _statuses(client: NpcClient) -> dict[str, pb.Character]:
    return {c.id: c for c in await client.list_characters()}


async def _wait_status(client: NpcClient, cid: str, ok, timeout: float = RELOAD_TIMEOUT_S):
    """Polls ListCharacters until `ok(character)`: (seconds or None, the character as last listed)."""
    start = time.perf_counter()
    while True:
        character = (await _statuses(client)).get(cid)
        if character is not None and ok(character):
            return round(time.perf_counter() - start, 2), character
        if time.perf_counter() - start > timeout:
            return None, character
        await asyncio.sleep(0.1)


def _write(path: Path, data: bytes, atomic: bool) -> None:
    """Atomically (a temporary file renamed over it, as editors save) or in place (truncate, then write)."""
    if atomic:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    else:
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.truncate(0)
            f.write(data)


async def _step_edits(run: Run) -> dict:
    target = run.ids[0]
    folder = run.root / target
    path = folder / "character.yaml"
    original = path.read_bytes()
    data = yaml.safe_load(original)
    versions = {c.id: c.version for c in (await _statuses(run.client)).values()}
    written = [versions[target]]
    edits = max(2, round(run.cfg.duration * 0.4 / EDIT_EVERY_S))  # at least one atomic and one in-place write
    listed: Counter[str] = Counter()  # what ListCharacters said about the target between edits

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            c = (await _statuses(run.client))[target]
            listed[pb.CharacterStatus.Name(c.status).removeprefix("CHARACTER_STATUS_")] += 1
            await asyncio.sleep(0.25)

    players = _Players(run, target, "edit")
    watching = asyncio.Event()
    watcher = asyncio.create_task(watch(watching))
    for n in tqdm(range(1, edits + 1), desc="b) character.yaml edits", unit="edit"):
        await asyncio.sleep(EDIT_EVERY_S)
        persona = data["persona"].rstrip() + f"\nToday is day {n} of the harvest festival; mention it if asked."
        text = yaml.safe_dump({**data, "persona": persona}, sort_keys=False, allow_unicode=True).encode()
        await asyncio.to_thread(_write, path, text, n % 2 == 1)
        written.append(load_character(folder).version)
    await asyncio.to_thread(_write, path, original, True)
    reload_s, final = await _wait_status(
        run.client, target, lambda c: c.version == versions[target] and c.status == pb.CHARACTER_STATUS_READY)
    records = await players.finish(run)
    watching.set()
    await watcher
    mine = [r for r in records if r.character == target]
    bad = [r for r in records if r.ok and r.version not in (written if r.character == target
                                                             else [versions[r.character]])]
    seen = {r.version for r in mine if r.ok}
    failed = status_counts(records)
    return {
        "step": "b", "name": f"{target}/character.yaml rewritten every {EDIT_EVERY_S:g} s under load",
        "figures": {"edits": edits, "atomic": (edits + 1) // 2, "in_place": edits // 2, "replies": len(records),
                    "replies_to_edited": len(mine), "failed": failed, "unknown_versions": len(bad),
                    "distinct_versions_seen": len(seen), "versions_written": len(set(written)),
                    "listed_statuses": dict(listed), "back_to_original_s": reload_s,
                    "final_status": pb.CharacterStatus.Name(final.status) if final else None},
        "summary": (f"{edits} edits ({(edits + 1) // 2} atomic, {edits // 2} in place); {len(records)} replies, "
                    f"{len(mine)} from {target}: failed {_counts(failed)}, {len(seen)} distinct versions seen of "
                    f"{len(set(written))} written, {len(bad)} unknown; original back in {reload_s} s"),
    }


# --- c) adapter overwritten with garbage under load --------------------------------------------


async def _step_adapter(run: Run) -> dict:
    listed = await _statuses(run.client)
    with_adapter = [cid for cid in run.ids if listed[cid].has_adapter]
    if not with_adapter:
        return {"step": "c", "name": "adapter overwritten under load", "figures": {},
                "summary": "skipped: no character has an adapter"}
    target = with_adapter[1 % len(with_adapter)]  # not step b's character, when there is another
    good_version = listed[target].version
    path = run.root / target / "adapter" / "adapter_model.safetensors"
    good = path.read_bytes()
    hold = max(1.0, run.cfg.duration * 0.4 / 3)
    phases = {}

    def broken(c: pb.Character) -> bool:
        return c.status == pb.CHARACTER_STATUS_FAILED

    players = _Players(run, target, "adapter")
    bar = tqdm(total=3, desc="c) adapter garbage", unit="phase")
    for name, data, atomic, until in (
            ("random bytes, in place", os.urandom(len(good)), False, broken),
            ("truncated copy, atomic", good[: len(good) // 2], True, None),
            ("restored, atomic", good, True, lambda c: c.status == pb.CHARACTER_STATUS_READY)):
        before = (await _statuses(run.client))[target].error
        await asyncio.sleep(hold / 2)
        await asyncio.to_thread(_write, path, data, atomic)
        # The truncated copy leaves the status FAILED: wait for its own error message instead.
        seconds, c = await _wait_status(run.client, target, until or (lambda c, b=before: broken(c) and c.error != b))
        phases[name] = {"seen_after_s": seconds, "status": pb.CharacterStatus.Name(c.status).removeprefix(
            "CHARACTER_STATUS_"), "serving": c.serving, "version_is_last_good": c.version == good_version,
            "error": c.error[:300]}
        await asyncio.sleep(hold / 2)
        bar.update()
    bar.close()
    records = await players.finish(run)
    mine = [r for r in records if r.character == target]
    failed = status_counts(records)
    wrong = sum(r.ok and r.version != good_version for r in mine)
    return {
        "step": "c", "name": f"{target}'s adapter overwritten with garbage under load",
        "figures": {"replies": len(records), "replies_to_broken": len(mine), "failed": failed,
                    "replies_not_from_last_good_version": wrong, "phases": phases},
        "summary": (f"{len(records)} replies, {len(mine)} from {target}: failed {_counts(failed)}; while broken "
                    f"ListCharacters said " + ", ".join(
                        f"{p['status']}{' serving' if p['serving'] else ''} ({name}, {p['seen_after_s']} s)"
                        for name, p in phases.items())),
    }


# --- d) SIGTERM under load, sessions across the restart -------------------------------------------


async def _step_sigterm(run: Run) -> dict:
    cfg, proc = run.cfg, run.server.proc
    players = _Players(run, run.ids[-1], "term", session_share=1.0)
    await asyncio.sleep(max(2.0, cfg.duration * 0.2))
    with tqdm(total=2, desc="d) SIGTERM", unit="check") as bar:
        signalled = time.perf_counter()
        players.stop.set()  # nobody starts a new reply; the ones in flight are the test
        proc.send_signal(signal.SIGTERM)

        def wait_exit() -> float | None:
            try:
                proc.wait(cfg.grace + EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return None
            return time.perf_counter() - signalled

        exit_s = await asyncio.to_thread(wait_exit)
        records = await players.finish(run)
        bar.update()
        sessions = await _check_sessions(run)
        bar.update()
    in_flight = [r for r in records if r.ended_at > signalled]
    finished = [r for r in in_flight if r.ok]
    late = [r for r in finished if r.ended_at - signalled > cfg.grace + 1.0]  # 1 s: the emotion score, transport
    stopped = [r for r in in_flight
               if not r.ok and (r.finish == "CANCELLED" or r.status in ("CANCELLED", "UNAVAILABLE"))]
    other = status_counts([r for r in in_flight if not r.ok and r not in stopped])
    before = status_counts([r for r in records if r.ended_at <= signalled])
    return {
        "step": "d", "name": f"SIGTERM under load (--grace {cfg.grace:g})",
        "figures": {"in_flight_at_signal": len(in_flight), "finished_in_grace": len(finished) - len(late),
                    "finished_late": len(late),
                    "last_finished_after_signal_s": round(max(r.ended_at - signalled for r in finished), 2)
                    if finished else None,
                    "cancelled_or_unavailable": len(stopped),
                    "in_flight": [{"ended_after_signal_s": round(r.ended_at - signalled, 2), "outcome": r.outcome,
                                   "finish": r.finish, "deltas": r.deltas} for r in in_flight],
                    "cancelled_by": status_counts(stopped), "other_outcomes": other, "failed_before_signal": before,
                    "exit_s": round(exit_s, 2) if exit_s is not None else None, "exit_code": proc.returncode,
                    "sessions": sessions},
        "summary": (f"{len(in_flight)} in flight: {len(finished) - len(late)} finished within the grace "
                    f"(the last {max((r.ended_at - signalled for r in finished), default=0):.2f} s after SIGTERM), "
                    f"{len(late)} late, {len(stopped)} cancelled ({_counts(status_counts(stopped))}), other "
                    f"{_counts(other)}; exit {proc.returncode} after "
                    f"{round(exit_s, 2) if exit_s is not None else f'>{cfg.grace + EXIT_TIMEOUT_S:g}'} s; sessions: "
                    + sessions["summary"]),
    }


async def _check_sessions(run: Run) -> dict:
    """Restarts the server on the same --session-store and asks it for every turn the clients saw finish."""
    expected: dict[str, list[tuple[str, str]]] = {}
    for r in sorted((r for r in run.records if r.session_id and r.ok), key=lambda r: r.ended_at):
        expected.setdefault(r.session_id, []).append((r.player_line, r.text))
    try:
        restarted = await asyncio.to_thread(BenchServer.start, run.root, run.store.with_name("restarted.log"),
                                            "--session-store", str(run.store))
    except RuntimeError as e:  # e.g. the server refuses its own session file: that is the finding
        last = str(e).strip().splitlines()[-1:]
        return {"restarted": False, "summary": f"the restarted server did not start: {last}"}
    missing, extra, out_of_order, not_found = 0, 0, 0, 0
    try:
        async with NpcClient(restarted.address, timeout=10.0) as client:
            for sid, turns in expected.items():
                try:
                    got = [(t.player_line, t.npc_line) for t in (await client.export_session(sid)).turns]
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    got, not_found = [], not_found + 1
                missing += sum((Counter(turns) - Counter(got)).values())
                extra += sum((Counter(got) - Counter(turns)).values())  # finished, but the client never saw it
                out_of_order += not _is_subsequence(turns, got)
    finally:
        exit_code = await asyncio.to_thread(restarted.stop)
    total = sum(len(t) for t in expected.values())
    return {"restarted": True, "sessions": len(expected), "turns_expected": total,
            "turns_missing": missing, "turns_extra": extra, "sessions_out_of_order": out_of_order,
            "sessions_not_found": not_found, "restarted_exit_code": exit_code,
            "summary": (f"{total} turns in {len(expected)} sessions checked after a restart: {missing} missing, "
                        f"{out_of_order} session(s) out of order, {extra} extra")}


def _is_subsequence(needle: list, haystack: list) -> bool:
    it = iter(haystack)
    return all(item in it for item in needle)


# --- report ------------------------------------------------------------------------------------


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _markdown(d: dict, link: str) -> str:
    m, c = d["machine"], d["config"]
    text = "## Faults under load (`--scenario faults`)\n\n"
    if d["smoke"]:
        text += ("> **Smoke run** (fewer clients, disconnects or seconds than the recorded run, on a shared "
                 "machine): it checks the harness; its figures are not the recorded ones.\n\n")
    text += (f"Command: `{d['command']}`  \nMachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
             f"load average {m['load_average_1min']} at the start; run of {m['date']}.\n\n"
             f"One `npc serve` (defaults, `--grace {c['grace']:g}`, `--session-store`) on a copy of the "
             f"characters; {c['clients']} players talk during steps b-d. Server log: {d['server_log_errors']} "
             f"error(s), {d['server_log_warnings']} warning(s) (the broken files of steps b and c are expected to "
             "warn). Figures only: the checks of these faults are tests (tests/test_server_reliability.py).\n\n")
    rows = [[s["step"], s["name"], s["summary"]] for s in d["steps"]]
    text += markdown_table(["step", "fault", "figures"], rows)
    if d["server_log_error_samples"]:
        text += "\n\nServer log errors: " + "; ".join(f"`{e[:120]}`" for e in d["server_log_error_samples"])
    text += f"\n\n![faults: server RSS and queue through the steps]({link}faults.png) ([JSON]({link}faults.json))"
    return text


def _plot(path: Path, d: dict) -> None:
    plt = pyplot()

    fig, (rss, queue) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    t = d["timeline"]
    rss.plot(t["t_s"], t["rss_mb"], color="C2")
    rss.set_ylabel("server VmRSS (MB)")
    queue.plot(t["t_s"], t["active_sequences"], label="active sequences")
    queue.plot(t["t_s"], t["waiting_requests"], label="waiting requests")
    queue.set_ylabel("replies")
    queue.set_xlabel("seconds since start")
    queue.legend(loc="upper right", fontsize=8)
    for ax in (rss, queue):
        for i, s in enumerate(d["steps"]):
            ax.axvspan(*s["span_s"], color=f"C{i}", alpha=0.08)
            if ax is rss:
                ax.text(s["span_s"][0], 1.0, f" {s['step']})",
                        transform=ax.get_xaxis_transform(), fontsize=8, va="top")
        ax.grid(alpha=0.3)
    fig.suptitle("npc bench --scenario faults" + (" (smoke run)" if d["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
