"""`npc bench --scenario retrieval`: how long a turn's fact retrieval takes with a big lore folder, and how
often it puts the fact a player asks about into the prompt (issue 16).

Lore: `--entries` random entries (10,000 by default) of 12-24 words drawn from a 5,000-word vocabulary,
spread over 20 files, each scoped to everyone, one of 8 factions, one of 8 places or one of 8
characters, written as YAML into a temporary lore folder and loaded by `LoreLibrary` as the server does.
Each measured turn: one of the sample characters (given one faction and one place of the random world) asks
a line of 6-14 words, half of them taken from an entry, and `FactRetriever.for_turn` picks its facts with
the last exchange as context. The times are per turn on one thread; the index build is timed once.

Recall: for every question of the sample characters' facts.jsonl that names the fact it targets, whether
that knowledge line is in the facts block and whether it is first (the sample world's own lore included),
as served (sentence vectors + BM25) and with BM25 alone (`Grounding(meaning_weight=0)`).
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sidecar.bench.report import machine_description, markdown_table, targets_table, write_report
from sidecar.dialogue.characters import Character, load_character
from sidecar.dialogue.lore import LORE_FOLDER, WORLD_FILE, LoreLibrary
from sidecar.dialogue.retrieval import FactRetriever, Grounding
from sidecar.dialogue.sessions import Turn
from sidecar.figures import pyplot

P95_TARGET_MS = 20.0


@dataclass(frozen=True)
class RetrievalConfig:
    characters: Path
    entries: int = 10_000
    turns: int = 2_000
    out_dir: Path = Path("docs/bench")
    seed: int = 0


def _random_lore(folder: Path, entries: int, rng: random.Random) -> list[str]:
    vocab = [f"{rng.choice('bcdfghklmnprstvz')}{rng.choice('aeiou')}{rng.choice('lmnrst')}{i}" for i in range(5000)]
    groups = {"factions": [f"faction-{i}" for i in range(8)], "places": [f"place-{i}" for i in range(8)]}
    (folder / WORLD_FILE).write_text(json.dumps(groups))  # YAML is a superset of JSON
    texts = [" ".join(rng.choices(vocab, k=rng.randint(12, 24))) + "." for _ in range(entries)]
    per_file = -(-entries // 20)
    for f in range(20):
        chunk = texts[f * per_file:(f + 1) * per_file]
        kind = ("everyone", "factions", "places", "characters")[f % 4]
        names = groups.get(kind, [f"npc-{i}" for i in range(8)])
        scope = "everyone" if kind == "everyone" else {kind: [names[f % 8]]}
        (folder / f"lore-{f:02d}.yaml").write_text(json.dumps({"scope": scope, "entries": chunk}))
    return texts


def _latency(retriever: FactRetriever, characters: list[Character], texts: list[str], turns: int,
             rng: random.Random) -> list[float]:
    times = []
    for i in range(turns):
        character = characters[i % len(characters)]
        words = rng.choice(texts).rstrip(".").split()
        line = " ".join(rng.sample(words, min(len(words), rng.randint(3, 7))) + ["what", "about", "it", "then"])
        history = [Turn(character.id, " ".join(rng.choice(texts).split()[:6]), "Hm, maybe.")]
        start = time.perf_counter()
        retriever.for_turn(character, history, line)
        times.append((time.perf_counter() - start) * 1000)
    return times


def _recall(root: Path, grounding: Grounding) -> dict[str, tuple[float, float]]:
    """Share of facts.jsonl questions whose target knowledge line is in the facts block, and first in it."""
    out = {}
    for folder in sorted(p for p in root.iterdir() if (p / "facts.jsonl").is_file()):
        character = load_character(folder)
        retriever = FactRetriever(LoreLibrary(root / LORE_FOLDER), grounding)
        questions = [json.loads(x) for x in (folder / "facts.jsonl").read_text().splitlines() if x.strip()]
        targeted = [q for q in questions if isinstance(q.get("fact"), int)]
        blocks = [(character.knowledge[q["fact"]], retriever.facts(character, q["question"])) for q in targeted]
        n = len(targeted) or float("nan")
        out[character.id] = (sum(t in b for t, b in blocks) / n, sum(b[:1] == (t,) for t, b in blocks) / n)
    return out


def run_retrieval_bench(cfg: RetrievalConfig, command: str) -> dict:
    rng = random.Random(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="npc-bench-lore-") as tmp:
        folder = Path(tmp)
        texts = _random_lore(folder, cfg.entries, rng)
        start = time.perf_counter()
        library = LoreLibrary(folder)
        library.reload()
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        retriever = FactRetriever(library)
        indexed = time.perf_counter() - start
        samples = [load_character(p) for p in sorted(cfg.characters.iterdir()) if (p / "character.yaml").is_file()]
        characters = [replace(c, id=f"npc-{i % 8}", factions=frozenset({f"faction-{i % 8}"}),
                              places=frozenset({f"place-{(i + 3) % 8}"})) for i, c in enumerate(samples)]
        _latency(retriever, characters, texts, 50, rng)  # warm-up: masks, knowledge indexes
        times = _latency(retriever, characters, texts, cfg.turns, rng)
    times.sort()
    q = statistics.quantiles(times, n=100)
    data = {"machine": machine_description(), "command": command, "entries": len(library.snapshot().entries),
            "turns": cfg.turns, "load_s": loaded, "index_s": indexed,
            "p50_ms": q[49], "p95_ms": q[94], "p99_ms": q[98], "max_ms": times[-1],
            "recall": _recall(cfg.characters, Grounding()),
            "recall_words_only": _recall(cfg.characters, Grounding(meaning_weight=0.0))}
    met = data["p95_ms"] <= P95_TARGET_MS
    rows = [[cid, *(f"{x:.2f}" for x in data["recall"][cid]), *(f"{x:.2f}" for x in data["recall_words_only"][cid])]
            for cid in data["recall"]]
    markdown = "\n\n".join([
        "# Fact retrieval (`npc bench --scenario retrieval`)",
        f"`{command}` on {data['machine'].get('cpu', 'this machine')}.",
        targets_table([{"target": f"retrieval p95 <= {P95_TARGET_MS:g} ms with {data['entries']} lore entries",
                        "value": f"{data['p95_ms']:.2f} ms", "met": met}]),
        markdown_table(["entries", "turns", "load (s)", "index (s)", "p50 (ms)", "p95 (ms)", "p99 (ms)", "max (ms)"],
                       [[data["entries"], cfg.turns, f"{loaded:.2f}", f"{indexed:.2f}", f"{data['p50_ms']:.3f}",
                         f"{data['p95_ms']:.3f}", f"{data['p99_ms']:.3f}", f"{data['max_ms']:.3f}"]]),
        "Recall: share of each sample character's facts.jsonl questions whose target knowledge line is in "
        "the facts block, and first in it (the sample lore included); served (sentence vectors + BM25) and "
        "BM25 alone.",
        markdown_table(["character", "in block (served)", "first (served)", "in block (BM25 alone)",
                        "first (BM25 alone)"], rows),
    ])

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.hist(times, bins=60, color="#4a7ab7")
        ax.axvline(data["p95_ms"], color="black", linestyle="--", label=f"p95 {data['p95_ms']:.2f} ms")
        ax.set_xlabel("facts for one turn (ms)")
        ax.set_ylabel("turns")
        ax.set_title(f"Fact retrieval over {data['entries']} lore entries")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    for path in write_report(cfg.out_dir, "retrieval", data, markdown, plot):
        print(path)
    return data
