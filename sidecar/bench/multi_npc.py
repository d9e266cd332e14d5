"""`npc bench --scenario multi-npc`: N NPCs talk at once, each with its own LoRA adapter.

Each (system, N) runs in a fresh subprocess (`python -m sidecar.bench.multi_npc ...`), so peak
RSS is that system's own and one system's caches never help another. All N requests count as
submitted at the same instant; every system generates exactly `tokens` tokens per NPC.

Systems: npc-sidecar (this engine, one adapter per NPC), npc-sidecar-no-lora (the same engine
and prompts without adapters: the LoRA overhead), hf-peft (transformers + PEFT mixed-adapter
batch) and llama.cpp (llama-cpp-python, adapters converted to GGUF LoRA, one request at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sidecar.bench.report import machine_description, markdown_table, write_report
from sidecar.bench.timing import RequestTiming, peak_rss_mb, summarize
from sidecar.bench.workload import persona, player_line, write_random_adapter

SYSTEMS = ("npc-sidecar", "npc-sidecar-no-lora", "hf-peft", "llama.cpp")
PEERS = ("llama.cpp", "hf-peft")


@dataclass(frozen=True)
class MultiNpcConfig:
    model: Path
    ns: tuple[int, ...] = (1, 4, 8, 16, 32)
    tokens: int = 64
    peers: tuple[str, ...] = PEERS
    workdir: Path = Path("/tmp/npc-bench-multi")
    out_dir: Path = Path("docs/bench")
    json_path: Path | None = None
    rank: int = 16


def _prompts(model: Path, n: int) -> list[list[int]]:
    from sidecar.engine.tokenizer import ChatMessage, Tokenizer
    from sidecar.model.checkpoint import load_checkpoint

    tok = Tokenizer(load_checkpoint(model))
    return [tok.encode_chat([ChatMessage("system", persona(i)), ChatMessage("user", player_line(i))])
            for i in range(n)]


def _adapter_dirs(workdir: Path, n: int) -> list[Path]:
    return [workdir / "adapters" / f"npc{i}" for i in range(n)]


def prepare(cfg: MultiNpcConfig) -> None:
    """Writes the random adapters (and their llama.cpp conversions) once for every run."""
    from sidecar.model.checkpoint import load_checkpoint

    config = load_checkpoint(cfg.model).config
    n = max(cfg.ns)
    for i, folder in enumerate(_adapter_dirs(cfg.workdir, n)):
        if not (folder / "adapter_model.safetensors").exists():
            write_random_adapter(folder, config, seed=1000 + i, rank=cfg.rank)
        if "llama.cpp" in cfg.peers and not (folder / "adapter.gguf").exists():
            from sidecar.bench.peer_llama_cpp import convert_peft_to_gguf_lora

            convert_peft_to_gguf_lora(folder, config, folder / "adapter.gguf")


# --- workers (one per subprocess) ----------------------------------------------------------------


async def _sidecar(model: Path, adapters: list[Path] | None, prompts: list[list[int]], tokens: int) -> dict:
    from sidecar.config import EngineConfig, ModelConfig
    from sidecar.engine.base_model import load_base_model
    from sidecar.engine.engine import AsyncEngine
    from sidecar.engine.sampler import SamplingParams
    from sidecar.engine.sequence import AdapterRef

    n = len(prompts)
    engine = AsyncEngine(lambda: load_base_model(ModelConfig(model, "auto")),
                         EngineConfig(max_batch=max(n, 1), max_resident_adapters=max(n, 1), max_waiting=max(64, n)))
    base = engine.base
    refs = [AdapterRef(f"npc{i}", a) for i, a in enumerate(adapters)] if adapters else [None] * n
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)

    async def one(ids: list[int], ref, timing: RequestTiming) -> None:
        async for event in engine.submit(ids, ref, params):
            if event.kind == "delta":
                now = time.perf_counter()
                timing.token_times.extend([now] * len(event.token_ids))
            elif event.kind == "error":
                raise RuntimeError(event.error)

    # Warm-up (not timed): load every adapter and run the kernels once, then forget the cached
    # prefixes so that every persona below is cold, as it is for the peers.
    await asyncio.gather(*[one(p[:8], r, RequestTiming(0.0)) for p, r in zip(prompts, refs, strict=True)])
    engine.core.prefix.clear()

    start = time.perf_counter()
    timings = [RequestTiming(start) for _ in prompts]
    await asyncio.gather(*[one(p, r, t) for p, r, t in zip(prompts, refs, timings, strict=True)])
    result = summarize(timings)

    # Warm persona: the same NPC again with another player line; its persona K/V is cached.
    from sidecar.engine.tokenizer import ChatMessage

    extra = {}
    if n == 1:
        engine.core.prefix.clear()
        tok = base.tokenizer
        for label, line in (("cold", "Who are you?"), ("warm", "And what do you do here?")):
            ids = tok.encode_chat([ChatMessage("system", persona(0)), ChatMessage("user", line)])
            t = RequestTiming(time.perf_counter())
            await one(ids, refs[0], t)
            extra[f"ttft_{label}_ms"] = (t.token_times[0] - t.submitted) * 1000
    await engine.shutdown()
    return {**result, **extra}


def _hf_peft(model: Path, adapters: list[Path], prompts: list[list[int]], tokens: int) -> dict:
    from sidecar.bench.peer_hf_peft import run_hf_peft

    return summarize(run_hf_peft(model, adapters, prompts, tokens))


def _llama_cpp(model: Path, adapters: list[Path], prompts: list[list[int]], tokens: int) -> dict:
    from sidecar.bench.peer_llama_cpp import run_llama_cpp

    return summarize(run_llama_cpp(model, [a / "adapter.gguf" for a in adapters], prompts, tokens))


def worker(system: str, model: Path, workdir: Path, n: int, tokens: int) -> dict:
    prompts = _prompts(model, n)
    adapters = _adapter_dirs(workdir, n)
    if system == "npc-sidecar":
        result = asyncio.run(_sidecar(model, adapters, prompts, tokens))
    elif system == "npc-sidecar-no-lora":
        result = asyncio.run(_sidecar(model, None, prompts, tokens))
    elif system == "hf-peft":
        result = _hf_peft(model, adapters, prompts, tokens)
    elif system == "llama.cpp":
        result = _llama_cpp(model, adapters, prompts, tokens)
    else:
        raise ValueError(system)
    return {"system": system, "n": n, **result, "rss_mb": peak_rss_mb()}


# --- driver ----------------------------------------------------------------------------------------


def _available(peer: str) -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp" if peer == "llama.cpp" else "peft") is not None


def run_multi_npc_bench(cfg: MultiNpcConfig) -> dict:
    peers = tuple(p for p in cfg.peers if _available(p))
    skipped = sorted(set(cfg.peers) - set(peers))
    cfg = MultiNpcConfig(**{**cfg.__dict__, "peers": peers})
    prepare(cfg)
    systems = ["npc-sidecar", "npc-sidecar-no-lora", *peers]
    jobs = [(s, n) for n in cfg.ns for s in systems]
    results = []
    for system, n in tqdm(jobs, desc="multi-npc bench", unit="run"):
        cmd = [sys.executable, "-m", "sidecar.bench.multi_npc", "--system", system, "--model", str(cfg.model),
               "--workdir", str(cfg.workdir), "--n", str(n), "--tokens", str(cfg.tokens)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            tqdm.write(f"{system} n={n} failed: {run.stderr.strip().splitlines()[-1:]}")
            continue
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        r = results[-1]
        tqdm.write(f"{system:>20} n={n:<3} {r['tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.0f} ms  "
                   f"ITL p50 {r['itl_p50_ms']:6.1f} ms  RSS {r['rss_mb']:5.0f} MB")
    data = {"scenario": "multi-npc", "model": str(cfg.model), "tokens": cfg.tokens, "rank": cfg.rank,
            "machine": machine_description(), "skipped_peers": skipped, "results": results}
    if cfg.json_path:
        cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_path.write_text(json.dumps(data, indent=2) + "\n")
    md = _markdown(data)
    write_report(cfg.out_dir, "multi_npc", data, md, lambda path: _plot(path, data))
    print(md)
    return data


def _markdown(data: dict) -> str:
    rows = []
    by = {(r["system"], r["n"]): r for r in data["results"]}
    for r in data["results"]:
        ours = by.get(("npc-sidecar", r["n"]))
        ratio = f"{ours['tok_s'] / r['tok_s']:.2f}x" if ours and r["system"] != "npc-sidecar" else "-"
        rows.append([r["system"], r["n"], f"{r['tok_s']:.0f}", f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p95_ms']:.0f}",
                     f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}", f"{r['rss_mb']:.0f}", ratio])
    header = ["system", "N", "tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p99 ms", "peak RSS MB",
              "npc-sidecar / this"]
    m = data["machine"]
    text = (f"Multi-NPC: N NPCs at once, each with its own rank-{data['rank']} LoRA (q,k,v,o,gate,up,down), "
            f"~150-token persona + a player line, {data['tokens']} new tokens each. {m['cpu']}, {m['cores']} cores, "
            f"torch {m['torch']}, {m['date']}.\n\n" + markdown_table(header, rows))
    warm = [r for r in data["results"] if "ttft_warm_ms" in r]
    if warm:
        w = warm[0]
        text += (f"\n\nPersona prefix cache (npc-sidecar, one NPC alone): cold TTFT {w['ttft_cold_ms']:.0f} ms, "
                 f"warm TTFT {w['ttft_warm_ms']:.0f} ms ({w['ttft_warm_ms'] / w['ttft_cold_ms']:.2f}x).")
    if data["skipped_peers"]:
        text += f"\n\nNot installed, skipped: {', '.join(data['skipped_peers'])}."
    return text


def _plot(path: Path, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for system in SYSTEMS:
        rows = sorted((r for r in data["results"] if r["system"] == system), key=lambda r: r["n"])
        if not rows:
            continue
        ns = [r["n"] for r in rows]
        left.plot(ns, [r["tok_s"] for r in rows], marker="o", label=system)
        right.plot(ns, [r["ttft_p50_ms"] for r in rows], marker="o", label=system)
    ns = sorted({r["n"] for r in data["results"]})
    for ax, label in ((left, "aggregate decode tokens/s"), (right, "time to first token p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("NPCs talking at once (each its own adapter)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend()
    fig.suptitle("Multi-NPC, SmolLM2-135M Q4_1 + rank-16 LoRA per NPC, 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description="one multi-npc bench run (used by npc bench)")
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    a = p.parse_args()
    print(json.dumps(worker(a.system, Path(a.model), Path(a.workdir), a.n, a.tokens)))


if __name__ == "__main__":
    main()
