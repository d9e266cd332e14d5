"""`npc bench --scenario decode`: decode tokens/s per weight format and batch size, with peers.

Every row of a batch decodes the same prompt (uniform lengths), so this measures the model's
step cost, not scheduling. llama.cpp (llama-cpp-python, optional `peers` extra) runs the same
GGUF single-stream in the same run: absolute figures drift on a shared machine, ratios less. It runs
in a process of its own: a build that crashes (llama.cpp's AMX kernels on a VM that does not enable
AMX died with SIGSEGV) is a failed row of the report, never a dead benchmark.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sidecar.bench.report import machine_description, markdown_table, write_report
from sidecar.engine.base_model import describe_formats
from sidecar.figures import pyplot
from sidecar.model.checkpoint import load_checkpoint
from sidecar.model.llama import LlamaModel

PROMPT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his "
          "father had taught him, and at the top he lit the great lamp that")


@dataclass(frozen=True)
class DecodeBenchConfig:
    model: Path
    formats: tuple[str, ...] = ("auto", "int4", "int8", "bf16", "fp32")
    batches: tuple[int, ...] = (1, 8, 32)
    steps: int = 32
    repeats: int = 3
    prompt_tokens: int = 64
    peers: bool = True
    out_dir: Path = Path("docs/bench")
    name: str = "decode"  # the report's file name
    title: str = "SmolLM2-135M-Instruct Q4_1"  # what the plot says was decoded


def _prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode_literal(PROMPT)
    return (ids * (n // len(ids) + 1))[:n]


def _torch_decode_rate(model: LlamaModel, prompt: list[int], batch: int, steps: int, repeats: int) -> float:
    """Median tokens/s over `repeats` runs of `steps` batched decode steps after a batched prefill."""
    rates = []
    for _ in range(repeats):
        cache = model.new_cache(rows=batch, max_len=len(prompt) + steps + 4)
        rows = list(range(batch))
        logits = model.forward(torch.tensor([prompt] * batch), start=[0] * batch, rows=rows, cache=cache)
        tokens = logits.argmax(-1, keepdim=True)
        model.forward(tokens, start=[len(prompt)] * batch, rows=rows, cache=cache)  # warm-up step
        t0 = time.perf_counter()
        for step in range(steps):
            logits = model.forward(tokens, start=[len(prompt) + 1 + step] * batch, rows=rows, cache=cache)
            tokens = logits.argmax(-1, keepdim=True)
        rates.append(batch * steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def run_isolated(fn: Callable, *args) -> tuple[object, str]:
    """fn(*args) in a fresh process (spawned: nothing of this one's threads or libraries), as (result, "")
    or (None, what went wrong) when that process died or raised."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result(), ""
        except BrokenProcessPool:
            return None, "its process died (a crash in native code)"
        except Exception as e:  # the peer's failure is a row of the report, whatever it is
            return None, f"{type(e).__name__}: {e}"


def _llama_cpp_rate(model_path: Path, prompt: list[int], steps: int, repeats: int, threads: int) -> float | None:
    """Single-stream greedy decode tokens/s of llama.cpp on the same GGUF, or None if not installed."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=len(prompt) + steps + 8, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    rates = []
    for _ in range(repeats):
        llm.reset()
        llm.eval(prompt)
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])  # warm-up step
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        rates.append(steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def run_decode_bench(cfg: DecodeBenchConfig) -> dict:
    from sidecar.engine.tokenizer import Tokenizer

    ckpt = load_checkpoint(cfg.model)
    prompt = _prompt_ids(Tokenizer(ckpt), cfg.prompt_tokens)
    results: dict[str, dict[int, float]] = {}
    jobs = [(f, b) for f in cfg.formats for b in cfg.batches]
    bar = tqdm(total=len(jobs) + (1 if cfg.peers else 0), desc="decode bench", unit="run")
    became: dict[str, str] = {}
    for fmt in cfg.formats:
        model = LlamaModel.from_checkpoint(ckpt, fmt)
        became[fmt] = describe_formats(model)
        results[fmt] = {}
        for batch in cfg.batches:
            bar.set_postfix_str(f"{fmt} batch {batch}")
            results[fmt][batch] = _torch_decode_rate(model, prompt, batch, cfg.steps, cfg.repeats)
            bar.update()
        del model
    peer, peer_error = None, ""
    if cfg.peers:
        bar.set_postfix_str("llama.cpp")
        peer, peer_error = run_isolated(_llama_cpp_rate, cfg.model, prompt, cfg.steps, cfg.repeats,
                                        torch.get_num_threads())
        bar.update()
    bar.close()

    data = {
        "scenario": "decode", "model": str(cfg.model), "machine": machine_description(),
        "prompt_tokens": cfg.prompt_tokens, "steps": cfg.steps, "repeats": cfg.repeats,
        "tokens_per_s": {f: {str(b): round(r, 1) for b, r in rs.items()} for f, rs in results.items()},
        "llama_cpp_single_stream": None if peer is None else round(peer, 1),
        "llama_cpp_error": peer_error or None,
        "formats_became": became,
    }
    md = _markdown(cfg, results, peer, data["machine"])
    md += "\n\nWhat each stored kind became: " + "; ".join(f"{f}: {b}" for f, b in became.items()) + "."
    if peer_error:
        md += f"\n\nllama.cpp (the `peers` extra) failed: {peer_error}. Rebuild it with `make peers`."
    write_report(cfg.out_dir, cfg.name, data, md, lambda path: _plot(path, cfg, results, peer))
    print(md)
    return data


def _markdown(cfg: DecodeBenchConfig, results: dict[str, dict[int, float]], peer: float | None, machine: dict) -> str:
    ratios = [b for b in cfg.batches if b in (1, 8)] if peer is not None else []
    header = (["weights"] + [f"batch {b}" for b in cfg.batches]
              + [f"batch {b} vs llama.cpp's one stream" for b in ratios])
    rows = [[f] + [f"{results[f][b]:.0f}" for b in cfg.batches] + [f"{results[f][b] / peer:.2f}x" for b in ratios]
            for f in cfg.formats]
    if peer is not None:
        rows.append(["llama.cpp, same GGUF (one stream)"] + [f"{peer:.0f}" if b == 1 else "-" for b in cfg.batches]
                    + ["1.00x" if b == 1 else "-" for b in ratios])
    return (f"Decode tokens/s of {cfg.model.name} (all rows of a batch together; median of {cfg.repeats} x "
            f"{cfg.steps} steps after a "
            f"{cfg.prompt_tokens}-token prompt). Machine: {machine['cpu']}, {machine['cores']} cores, "
            f"torch {machine['torch']}, {machine['date']}.\n\n" + markdown_table(header, rows))


def _plot(path: Path, cfg: DecodeBenchConfig, results: dict[str, dict[int, float]], peer: float | None) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fmt, rates in results.items():
        ax.plot(list(rates), list(rates.values()), marker="o", label=f"npc-sidecar {fmt}")
    if peer is not None:
        ax.axhline(peer, color="gray", linestyle="--", label="llama.cpp single stream")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(cfg.batches), [str(b) for b in cfg.batches])
    ax.set_xlabel("batch size (sequences decoded together)")
    ax.set_ylabel("decode tokens/s (all sequences)")
    ax.set_title(f"Decode throughput, {cfg.title}, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
