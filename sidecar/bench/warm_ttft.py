"""`npc bench --scenario warm-ttft`: time to first token of a character's first line in a session against
its next lines, with the facts block in every prompt (issue 16: what retrieval adds sits after the constant
persona block and the history, so the prefix cache keeps serving them).

A real `npc serve` (bench/server_process.py) on the characters folder. For each character, one session:
`--turns` player questions taken from its facts.jsonl (the grounded questions the prompt carries facts
for), greedy, `--tokens` tokens each, one after another. The first line of each character is cold (nothing
of it cached), the next ones warm. Reported per character: prompt tokens, tokens served from the prefix
cache (Started.cached_prompt_tokens) and time to first token (Finished.timings.first_token_ms), first line
against the median of the others; and the whole reply's time (Finished.timings.total_ms). Each session runs
once per `--fact-contrast` weight (0 and the default: what decoding against the prompt without the facts
costs, in the same run).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sidecar.bench.report import machine_description, markdown_table, write_report
from sidecar.bench.server_process import BenchServer
from sidecar.config import FACT_CONTRAST
from sidecar.figures import pyplot


@dataclass(frozen=True)
class WarmTtftConfig:
    characters: Path
    turns: int = 6
    tokens: int = 16
    out_dir: Path = Path("docs/bench")
    contrasts: tuple[float, ...] = tuple(sorted({0.0, FACT_CONTRAST}))  # npc serve --fact-contrast, each in turn


async def _session(address: str, cid: str, questions: list[str], tokens: int) -> list[dict]:
    from sidecar.client import NpcClient
    from sidecar.pb.npc.v1 import dialogue_pb2 as pb

    rows = []
    async with NpcClient(address) as client:
        for question in questions:
            started, _, finished = await client.say(cid, question, session_id=f"ttft-{cid}",
                                                    options=pb.GenerationOptions(max_tokens=tokens, temperature=0.0))
            rows.append({"question": question, "prompt_tokens": started.prompt_tokens,
                         "cached_tokens": started.cached_prompt_tokens, "facts": len(started.facts),
                         "history_turns": started.history_turns, "first_token_ms": finished.timings.first_token_ms,
                         "total_ms": finished.timings.total_ms})
    return rows


def run_warm_ttft_bench(cfg: WarmTtftConfig, command: str) -> dict:
    questions = {}
    for folder in sorted(cfg.characters.iterdir()):
        facts = folder / "facts.jsonl"
        if (folder / "character.yaml").is_file() and facts.is_file():
            lines = [json.loads(x)["question"] for x in facts.read_text().splitlines() if x.strip()]
            questions[folder.name] = lines[: cfg.turns]
    if not questions:
        raise ValueError(f"{cfg.characters}: no character with a facts.jsonl")
    with tempfile.TemporaryDirectory(prefix="npc-bench-ttft-") as tmp:
        root = Path(tmp) / "characters"
        shutil.copytree(cfg.characters, root)
        results = {}
        for contrast in cfg.contrasts:  # a fresh server each: nothing cached from the other weight
            server = BenchServer.start(root, Path(tmp) / "server.log", "--fact-contrast", str(contrast))
            try:
                results[contrast] = {cid: asyncio.run(_session(server.address, cid, qs, cfg.tokens))
                                     for cid, qs in questions.items()}
            finally:
                server.stop()
    summary = {f"{cid} @ {contrast}": {
        "cold_ms": rows[0]["first_token_ms"], "cold_prompt": rows[0]["prompt_tokens"],
        "cold_cached": rows[0]["cached_tokens"],
        "warm_ms": statistics.median(r["first_token_ms"] for r in rows[1:]),
        "warm_prompt": statistics.median(r["prompt_tokens"] for r in rows[1:]),
        "warm_cached": statistics.median(r["cached_tokens"] for r in rows[1:]),
        "warm_total_ms": statistics.median(r["total_ms"] for r in rows[1:])}
        for contrast, by_character in results.items() for cid, rows in by_character.items() if len(rows) > 1}
    data = {"machine": machine_description(), "command": command, "tokens": cfg.tokens, "summary": summary,
            "turns": {str(contrast): by_character for contrast, by_character in results.items()}}
    table = [[*key.split(" @ "), f"{s['cold_prompt']} / {s['cold_cached']}", f"{s['cold_ms']:.0f}",
              f"{s['warm_prompt']:.0f} / {s['warm_cached']:.0f}", f"{s['warm_ms']:.0f}",
              f"{s['warm_ms'] / s['cold_ms']:.2f}x", f"{s['warm_total_ms']:.0f}"] for key, s in summary.items()]
    markdown = "\n\n".join([
        "# Warm time to first token with the facts block (`npc bench --scenario warm-ttft`)",
        f"`{command}` on {data['machine'].get('cpu', 'this machine')}: per character one session of "
        f"{cfg.turns} questions from its facts.jsonl, greedy, {cfg.tokens} tokens each; the first line cold, "
        "the others warm (median); once with `--fact-contrast 0` and once with each other weight listed (a "
        "second K/V row per reply, its prompt less the facts).",
        markdown_table(["character", "--fact-contrast", "first: prompt / cached tokens", "first: TTFT ms",
                        "next (median): prompt / cached tokens", "next: TTFT ms", "next / first",
                        "next: whole reply ms"], table),
    ])

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        for contrast, by_character in results.items():
            for cid, rows in by_character.items():
                ax.plot(range(1, len(rows) + 1), [r["first_token_ms"] for r in rows], "o-" if contrast else "x--",
                        label=f"{cid}, contrast {contrast}")
        ax.set_xlabel("line of the session")
        ax.set_ylabel("time to first token (ms)")
        ax.set_title("First line cold, then warm (facts block in every prompt)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    for path in write_report(cfg.out_dir, "warm_ttft", data, markdown, plot):
        print(path)
    return data
