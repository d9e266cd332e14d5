"""`npc bench --scenario scenes`: K scenes of 3 NPCs at once against the same scenes one after another
(issue 17).

A real `npc serve` (bench/server_process.py) on the sample characters; each scene has three of them
(rotating over the folder's characters), a situation of its own and `--lines` lines of at most
`--tokens` tokens each, greedy. For each K (1, 4, 8 by default), the K scenes run once all at once (K
StartScene calls over one channel) and once one after another: the same casts and situations, each
way on its own evening (a sentence appended to the situation), so that neither finds the other's lines
in the prefix cache; only the persona blocks are shared, warm, as in a game.

Reported per run: lines per second (lines said / wall time), reply tokens per second, and the
hand-off: time from the end of one line (its `finished` event at the client) to the first text of the
next line of the same scene, p50 / p95. Run alone, a scene's lines wait for nothing but themselves;
run together, they share the model's batch: the ratio of lines per second is what batching buys.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sidecar.bench.report import machine_description, markdown_table, write_report
from sidecar.bench.server_process import BenchServer
from sidecar.figures import pyplot

SITUATIONS = [
    "A storm keeps everyone in the Drowned Lantern; talk turns to the Greyvein mine.",
    "Market day in Highmoor: the price of salt has doubled and nobody agrees why.",
    "Wolves were heard near the north gate last night; the watch asks who saw them.",
    "A stranger paid for the whole tavern's ale with a coin nobody recognises.",
    "The king's riders passed through at dawn without stopping; everyone has a guess.",
    "The old bridge creaked under a cart this morning; someone must fix it.",
    "A ship with black sails was seen off Saltmere; the harbour is nervous.",
    "The spring feast is in three days and nothing is ready.",
]

WARM_UP = "Before the doors open, the regulars wait outside in the cold."


@dataclass(frozen=True)
class ScenesConfig:
    characters: Path
    ks: tuple[int, ...] = (1, 4, 8)
    lines: int = 6  # per scene: each of the three speaks twice
    tokens: int = 32  # most tokens of one line's text
    out_dir: Path = Path("docs/bench")


@dataclass
class _Scene:
    lines: int = 0
    tokens: int = 0
    handoffs_ms: list[float] | None = None


async def _play(address: str, cast: tuple[str, ...], situation: str, cfg: ScenesConfig) -> _Scene:
    from sidecar.client import NpcClient
    from sidecar.pb.npc.v1 import dialogue_pb2 as pb

    result = _Scene(handoffs_ms=[])
    ended: float | None = None
    async with NpcClient(address) as client:
        options = pb.GenerationOptions(max_tokens=cfg.tokens, temperature=0.0)
        async for event in client.scene(cast, situation, max_lines=cfg.lines, options=options):
            if event.WhichOneof("event") != "line":
                continue
            kind = event.line.event.WhichOneof("event")
            if kind == "delta" and ended is not None:
                result.handoffs_ms.append((time.perf_counter() - ended) * 1000)
                ended = None
            elif kind == "finished":
                ended = time.perf_counter()
                result.lines += 1
                result.tokens += event.line.event.finished.usage.completion_tokens
    return result


PLAYER_LINES = ["Good evening. Any news today?", "What do you sell?", "Is the road north safe?"]


async def _player(address: str, character: str, delay: float) -> list[float]:
    """A player talking to `character` (no session) after `delay` s, three lines one after another: the
    time to each reply's first token (the server's Timings), so a player's wait beside scenes shows."""
    from sidecar.client import NpcClient
    from sidecar.pb.npc.v1 import dialogue_pb2 as pb

    await asyncio.sleep(delay)
    waits = []
    async with NpcClient(address) as client:
        for line in PLAYER_LINES:
            _, _, finished = await client.say(character, line, options=pb.GenerationOptions(max_tokens=16,
                                                                                           temperature=0.0))
            waits.append(finished.timings.first_token_ms)
    return waits


async def _run(address: str, scenes: list[tuple[tuple[str, ...], str]], cfg: ScenesConfig, together: bool,
               player: str = "") -> dict:
    start = time.perf_counter()
    waits: list[float] = []
    if together:
        jobs = [_play(address, cast, s, cfg) for cast, s in scenes]
        if player:  # the player speaks up once the scenes are under way
            *results, waits = await asyncio.gather(*jobs, _player(address, player, 2.0))
        else:
            results = await asyncio.gather(*jobs)
    else:
        results = [await _play(address, cast, s, cfg) for cast, s in scenes]
    wall = time.perf_counter() - start
    handoffs = sorted(h for r in results for h in r.handoffs_ms)
    lines, tokens = sum(r.lines for r in results), sum(r.tokens for r in results)
    return {"wall_s": wall, "lines": lines, "tokens": tokens, "lines_per_s": lines / wall,
            "tokens_per_s": tokens / wall,
            "handoff_p50_ms": statistics.median(handoffs) if handoffs else 0.0,
            "handoff_p95_ms": handoffs[min(len(handoffs) - 1, int(0.95 * len(handoffs)))] if handoffs else 0.0,
            "player_first_token_ms": waits}


def _scenes(casts: list[tuple[str, ...]], evening: str) -> list[tuple[tuple[str, ...], str]]:
    return [(cast, f"{SITUATIONS[i % len(SITUATIONS)]} It is the {evening}.") for i, cast in enumerate(casts)]


def run_scenes_bench(cfg: ScenesConfig, command: str) -> dict:
    ids = sorted(p.name for p in cfg.characters.iterdir() if (p / "character.yaml").is_file())
    if len(ids) < 3:
        raise ValueError(f"{cfg.characters}: a scene of three needs three characters, found {len(ids)}")
    with tempfile.TemporaryDirectory(prefix="npc-bench-scenes-") as tmp:
        root = Path(tmp) / "characters"
        shutil.copytree(cfg.characters, root)
        server = BenchServer.start(root, Path(tmp) / "server.log", "--max-batch", "32")
        try:
            runs = []
            # Warm-up (model, kernels, personas) on a situation no measured scene has: no run finds its lines cached.
            asyncio.run(_run(server.address, [(tuple(ids[:3]), WARM_UP)], cfg, True))
            # The player's lines, once to warm their prompts (every later time they are cached, so what
            # differs beside the scenes is the wait), then with nothing else running.
            asyncio.run(_player(server.address, ids[-1], 0.0))
            idle = asyncio.run(_player(server.address, ids[-1], 0.0))
            for k in cfg.ks:
                casts = [tuple(ids[(i + j) % len(ids)] for j in range(3)) for i in range(k)]
                # Each way of running gets its own evening: greedy lines of the same prompts would otherwise
                # come from the prefix cache the second time. Only the persona blocks are shared (warm).
                together = asyncio.run(_run(server.address, _scenes(casts, f"first evening of K={k}"), cfg, True))
                alone = asyncio.run(_run(server.address, _scenes(casts, f"second evening of K={k}"), cfg, False))
                # Once more at once, with a player talking beside the scenes: only the player's wait is kept.
                beside = asyncio.run(_run(server.address, _scenes(casts, f"third evening of K={k}"), cfg, True,
                                          player=ids[-1]))
                together["player_first_token_ms"] = beside["player_first_token_ms"]
                runs.append({"k": k, "together": together, "one_after_another": alone,
                             "lines_per_s_ratio": together["lines_per_s"] / alone["lines_per_s"]})
                print(f"K={k}: {together['lines_per_s']:.2f} lines/s together, {alone['lines_per_s']:.2f} "
                      f"one after another ({runs[-1]['lines_per_s_ratio']:.2f}x)", flush=True)
            errors = server.log_records("error")
        finally:
            server.stop()
    data = {"machine": machine_description(), "command": command, "characters": ids, "lines_per_scene": cfg.lines,
            "tokens_per_line": cfg.tokens, "runs": runs, "player_first_token_ms_idle": idle,
            "server_errors": len(errors)}
    rows = [[r["k"], f"{r['together']['lines_per_s']:.2f}", f"{r['one_after_another']['lines_per_s']:.2f}",
             f"{r['lines_per_s_ratio']:.2f}x", f"{r['together']['tokens_per_s']:.1f}",
             f"{r['one_after_another']['tokens_per_s']:.1f}",
             f"{r['together']['handoff_p50_ms']:.0f} / {r['together']['handoff_p95_ms']:.0f}",
             f"{r['one_after_another']['handoff_p50_ms']:.0f} / {r['one_after_another']['handoff_p95_ms']:.0f}"]
            for r in runs]
    markdown = "\n\n".join([
        "# Scenes (`npc bench --scenario scenes`)",
        f"`{command}` on {data['machine'].get('cpu', 'this machine')}: K scenes of three of {', '.join(ids)}, "
        f"{cfg.lines} lines each of at most {cfg.tokens} tokens, greedy; all K at once, then the same K one "
        "after another. Hand-off: from one line's end to the next line's first text, at the client.",
        markdown_table(["K", "lines/s together", "lines/s one after another", "ratio", "tokens/s together",
                        "tokens/s one after another", "hand-off p50 / p95 ms together",
                        "hand-off p50 / p95 ms one after another"], rows),
        f"A player beside the scenes (a third run of the K scenes at once; three lines to {ids[-1]}, 16 tokens "
        "each, starting 2 s in): time to first token "
        + ", ".join(f"K={r['k']}: {statistics.median(r['together']['player_first_token_ms']):.0f} ms"
                    for r in runs if r["together"]["player_first_token_ms"])
        + f" (median), against {statistics.median(idle):.0f} ms with nothing else running.",
        f"Server log errors during the run: {len(errors)}.",
    ])

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        ks = [r["k"] for r in runs]
        left.plot(ks, [r["together"]["lines_per_s"] for r in runs], "o-", label="all at once")
        left.plot(ks, [r["one_after_another"]["lines_per_s"] for r in runs], "s--", label="one after another")
        left.set_xlabel("scenes (K)")
        left.set_ylabel("lines per second")
        left.legend()
        right.plot(ks, [r["together"]["handoff_p50_ms"] for r in runs], "o-", label="all at once, p50")
        right.plot(ks, [r["one_after_another"]["handoff_p50_ms"] for r in runs], "s--", label="one after another, p50")
        right.set_xlabel("scenes (K)")
        right.set_ylabel("line end -> next line's first text (ms)")
        right.legend()
        fig.suptitle("Scenes of three NPCs")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    for path in write_report(cfg.out_dir, "scenes", data, markdown, plot):
        print(path)
    return data
