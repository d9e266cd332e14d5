"""`npc bench --scenario multi-npc`: N NPCs talk at once, each with its own LoRA adapter.

Each (system, N) runs in a fresh subprocess (`python -m sidecar.bench.multi_npc ...`), so peak
RSS is that system's own and one system's caches never help another. All N requests count as
submitted at the same instant; every system generates exactly `tokens` tokens per NPC.

Systems: npc-sidecar (this engine, one adapter per NPC), npc-sidecar-no-lora (the same engine
and prompts without adapters: the LoRA overhead), hf-peft (transformers + PEFT mixed-adapter
batch) and llama.cpp (llama-cpp-python, adapters converted to GGUF LoRA, one request at a time).

With `--device cuda` the engine and the hf-peft peer run on the GPU (bf16; llama.cpp, a CPU build
here, is left out) and the report is gpu.{json,md,png}. `--model-shape llama-3.2-1b` benchmarks a
random-weight model of that shape (sidecar/bench/random_model.py), since no weights can be
downloaded on the GPU machine. `run_timeout` and `time_budget` bound each run and the whole bench,
and the report is rewritten after every run, so a hung system or a killed bench still leaves figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from sidecar.bench.agreement import SCORED, compare, gap_summary, verified
from sidecar.bench.agreement import markdown as agreement_markdown
from sidecar.bench.report import machine_description, markdown_table, to_json, write_report
from sidecar.bench.timing import RequestTiming, peak_rss_mb, summarize
from sidecar.bench.workload import ADAPTER_STD, persona, player_line
from sidecar.figures import pyplot
from sidecar.model.random_adapter import write_random_adapter

SYSTEMS = ("npc-sidecar", "npc-sidecar-no-lora", "hf-peft", "llama.cpp")
PEERS = ("llama.cpp", "hf-peft")


_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


@dataclass(frozen=True)
class MultiNpcConfig:
    """One `npc bench --scenario multi-npc` run. Exactly one of `model` and `model_shape` names the model."""

    model: Path | None = None
    ns: tuple[int, ...] = (1, 4, 8, 16, 32)
    tokens: int = 64
    peers: tuple[str, ...] = PEERS
    workdir: Path = Path("/tmp/npc-bench-multi")
    out_dir: Path = Path("docs/bench")
    json_path: Path | None = None
    rank: int = 16
    device: str = "cpu"  # cpu | cuda | cuda:N
    weights: str | None = None  # our weight format; None: auto on the CPU, bf16 on a GPU
    model_shape: str | None = None  # a random-weight model of this shape (random_model.SHAPES), kept in workdir
    run_timeout: float | None = None  # seconds one (system, N) run may take before it is killed
    time_budget: float | None = None  # seconds for all runs together; runs that would start later are skipped

    def __post_init__(self) -> None:
        if (self.model is None) == (self.model_shape is None):
            raise ValueError("give exactly one of model and model_shape")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def report_name(self) -> str:
        """gpu.* on a GPU; on the CPU multi_npc.* (a random-weight shape gets its own name, so that such a
        run never overwrites the CPU figures in docs/bench)."""
        if self.on_gpu:
            return "gpu"
        return "multi_npc" if self.model_shape is None else f"multi_npc_{self.model_shape}"

    @property
    def resolved_weights(self) -> str:
        return self.weights or ("bf16" if self.on_gpu else "auto")


def _tokenizer(model: Path):
    """The model's tokenizer; a Hugging Face folder's weights are not read for it."""
    from sidecar.engine.tokenizer import Tokenizer
    from sidecar.model.checkpoint import load_checkpoint

    if Path(model).is_dir():
        from sidecar.model.hf_folder import read_hf_metadata

        return Tokenizer(read_hf_metadata(Path(model)))
    return Tokenizer(load_checkpoint(model))


def _prompts(model: Path, n: int) -> list[list[int]]:
    from sidecar.engine.tokenizer import ChatMessage

    tok = _tokenizer(model)
    return [tok.encode_chat([ChatMessage("system", persona(i)), ChatMessage("user", player_line(i))])
            for i in range(n)]


def _adapter_dirs(root: Path, n: int) -> list[Path]:
    return [root / f"npc{i}" for i in range(n)]


def _model_config(model: Path):
    from sidecar.model.checkpoint import load_checkpoint

    if Path(model).is_dir():
        from sidecar.model.hf_folder import read_hf_metadata

        return read_hf_metadata(Path(model)).config
    return load_checkpoint(model).config


def prepare(cfg: MultiNpcConfig, model: Path) -> Path:
    """Writes the random adapters (and their llama.cpp conversions) once for every run; returns their folder.

    The folder is named after the shapes and the scale of the adapters, so models of different shapes
    (or ranks) benchmarked with one workdir never share adapters.
    """
    import torch

    config = _model_config(model)
    dtype = torch.bfloat16 if cfg.on_gpu else torch.float32
    key = (f"l{config.num_layers}-h{config.hidden_size}-i{config.intermediate_size}-q{config.q_size}"
           f"-kv{config.kv_size}-r{cfg.rank}-std{ADAPTER_STD:g}-{str(dtype).removeprefix('torch.')}")
    root = cfg.workdir / "adapters" / key
    missing = [(i, f) for i, f in enumerate(_adapter_dirs(root, max(cfg.ns)))
               if not (f / "adapter_model.safetensors").exists()]
    if missing:
        with ThreadPoolExecutor(8) as pool:
            list(tqdm(pool.map(lambda job: write_random_adapter(job[1], config, seed=1000 + job[0], rank=cfg.rank,
                                                                std=ADAPTER_STD, dtype=dtype), missing),
                      total=len(missing), desc="random adapters", unit="adapter"))
    for folder in _adapter_dirs(root, max(cfg.ns)):
        if "llama.cpp" in cfg.peers and not (folder / "adapter.gguf").exists():
            from sidecar.bench.peer_llama_cpp import convert_peft_to_gguf_lora

            convert_peft_to_gguf_lora(folder, config, folder / "adapter.gguf")
    return root


# --- workers (one per subprocess) ----------------------------------------------------------------


async def _sidecar(model: Path, adapters: list[Path] | None, prompts: list[list[int]], tokens: int,
                   device: str = "cpu", weights: str = "auto") -> dict:
    from sidecar.config import EngineConfig, ModelConfig
    from sidecar.engine.api import SamplingParams
    from sidecar.engine.base_model import load_base_model
    from sidecar.engine.engine import AsyncEngine

    n = len(prompts)
    engine = AsyncEngine(lambda: load_base_model(ModelConfig(model, weights, device)),
                         EngineConfig(max_batch=max(n, 1), max_resident_adapters=max(n, 1), max_waiting=max(64, n)))
    refs = [engine.load_adapter(f"npc{i}", a, "1") for i, a in enumerate(adapters)] if adapters else [None] * n
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)

    async def one(ids: list[int], ref, timing: RequestTiming, generated: list[int] | None = None) -> None:
        async for event in engine.submit(ids, ref, params):
            if event.kind == "delta":
                now = time.perf_counter()
                timing.token_times.extend([now] * len(event.token_ids))
                if generated is not None:
                    generated.extend(event.token_ids)
            elif event.kind == "finished" and generated is not None:
                # The reply's ids: a last token whose bytes end mid-character has no delta of its own.
                generated[:] = event.token_ids
            elif event.kind == "error":
                raise RuntimeError(event.error)

    # Warm-up (not timed): load every adapter and run the kernels once, then forget the cached
    # prefixes so that every persona below is cold, as it is for the peers.
    await asyncio.gather(*[one(p[:8], r, RequestTiming(0.0)) for p, r in zip(prompts, refs, strict=True)])
    engine.core.kv.prefix.clear()

    start = time.perf_counter()
    timings = [RequestTiming(start) for _ in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    await asyncio.gather(*[one(p, r, t, g) for p, r, t, g in zip(prompts, refs, timings, generated, strict=True)])
    result = {**summarize(timings), "token_ids": generated}

    # Warm persona: the same NPC again with another player line; its persona K/V is cached.
    from sidecar.engine.tokenizer import ChatMessage

    extra = {}
    if n == 1:
        engine.core.kv.prefix.clear()
        tok = engine.model.tokenizer
        for label, line in (("cold", "Who are you?"), ("warm", "And what do you do here?")):
            ids = tok.encode_chat([ChatMessage("system", persona(0)), ChatMessage("user", line)])
            t = RequestTiming(time.perf_counter())
            await one(ids, refs[0], t)
            extra[f"ttft_{label}_ms"] = (t.token_times[0] - t.submitted) * 1000
    await engine.shutdown()
    return {**result, **extra}


def _peer_result(run: tuple) -> dict:
    """A peer's (timings, token ids, gaps per scored system) as a worker result."""
    timings, token_ids, gaps = run
    return {**summarize(timings), "token_ids": token_ids,
            "scores": {system: [gap_summary(g) for g in per_npc] for system, per_npc in gaps.items()}}


def _hf_peft(model: Path, adapters: list[Path], prompts: list[list[int]], tokens: int, device: str,
             score: dict[str, list[list[int]]]) -> dict:
    """On the CPU in float32 (as transformers dequantizes a GGUF); on a GPU in bf16, as one would serve it."""
    import torch

    from sidecar.bench.peer_hf_peft import run_hf_peft

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return _peer_result(run_hf_peft(model, adapters, prompts, tokens, dtype=dtype, device=device, score=score))


def _llama_cpp(model: Path, adapters: list[Path], prompts: list[list[int]], tokens: int,
               score: dict[str, list[list[int]]]) -> dict:
    from sidecar.bench.peer_llama_cpp import generate_llama_cpp

    return _peer_result(generate_llama_cpp(model, [a / "adapter.gguf" for a in adapters], prompts, tokens,
                                           score=score))


def worker(system: str, model: Path, adapters_root: Path, n: int, tokens: int, device: str = "cpu",
           weights: str = "auto", score: dict[str, list[list[int]]] | None = None) -> dict:
    """One (system, N) measurement in this process; on a GPU also its peak GPU memory.

    Every system reports its greedy `token_ids` per NPC; a peer also scores, after its timed run, the
    token ids of each system in `score` (agreement.py), so that the driver can tell whether they agree.
    """
    prompts = _prompts(model, n)
    adapters = _adapter_dirs(adapters_root, n)
    if system == "npc-sidecar":
        result = asyncio.run(_sidecar(model, adapters, prompts, tokens, device, weights))
    elif system == "npc-sidecar-no-lora":
        result = asyncio.run(_sidecar(model, None, prompts, tokens, device, weights))
    elif system == "hf-peft":
        result = _hf_peft(model, adapters, prompts, tokens, device, score or {})
    elif system == "llama.cpp":
        result = _llama_cpp(model, adapters, prompts, tokens, score or {})
    else:
        raise ValueError(system)
    result = {"system": system, "n": n, **result, "rss_mb": peak_rss_mb()}
    if device.startswith("cuda"):
        import torch

        result["gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


# --- driver ----------------------------------------------------------------------------------------

CPU_PLOT_TITLE = "Multi-NPC, SmolLM2-135M Q4_1 + rank-16 LoRA per NPC, 2-core CPU"
_MIN_RUN_S = 20.0  # under this much time left in the budget, a run is not started


def _available(peer: str) -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp" if peer == "llama.cpp" else "peft") is not None


def gpu_description(device: str) -> dict:
    """The GPU, its driver and the CUDA torch was built with (what gpu.md names)."""
    import torch

    info: dict = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info.update(name=torch.cuda.get_device_name(index), memory_gib=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count)
    except Exception as e:  # no usable GPU: the runs will say why; the report still gets written
        info["name"] = f"unavailable ({type(e).__name__}: {e})"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


def _versions() -> dict:
    import importlib.metadata

    out = {}
    for name in ("transformers", "peft"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _tail(text: str | bytes | None, lines: int = 20) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _run_one(cfg: MultiNpcConfig, model: Path, adapters: Path, system: str, n: int,
             timeout: float | None, results: list[dict]) -> tuple[dict | None, str | None]:
    """(result, None) or (None, why it failed), from one worker subprocess. A peer is handed the token ids
    of the systems it scores (agreement.SCORED) that have already run at this N."""
    cmd = [sys.executable, "-m", "sidecar.bench.multi_npc", "--system", system, "--model", str(model),
           "--adapters", str(adapters), "--n", str(n), "--tokens", str(cfg.tokens), "--device", cfg.device,
           "--weights", cfg.resolved_weights]
    score = {r["system"]: r["token_ids"] for r in results if r["n"] == n and r["system"] in SCORED}
    if system in PEERS and score:
        path = cfg.workdir / "tokens" / f"n{n}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(score))
        cmd += ["--score", str(path)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tqdm.write(f"{system} n={n} timed out after {timeout:.4g} s; its last output:\n{_tail(e.stderr)}")
        return None, f"timed out after {timeout:.4g} s"
    if run.returncode != 0:
        tqdm.write(f"{system} n={n} failed (exit {run.returncode}):\n{_tail(run.stderr)}")
        last = _tail(run.stderr, 1)
        return None, f"exit {run.returncode}: {last}" if last else f"exit {run.returncode}"
    return json.loads(run.stdout.strip().splitlines()[-1]), None


def run_multi_npc_bench(cfg: MultiNpcConfig) -> dict:
    started = time.monotonic()
    peers = tuple(p for p in cfg.peers if _available(p) and not (cfg.on_gpu and p == "llama.cpp"))
    skipped = sorted(set(cfg.peers) - set(peers))
    cfg = replace(cfg, peers=peers)
    model = cfg.model
    if cfg.model_shape is not None:
        from sidecar.bench.random_model import ensure_random_model

        model = ensure_random_model(cfg.workdir / "models", cfg.model_shape)
    adapters = prepare(cfg, model)
    systems = ["npc-sidecar", "npc-sidecar-no-lora", *peers]
    jobs = [(s, n) for n in cfg.ns for s in systems]
    if cfg.on_gpu:  # GPU time is scarce: the comparison with the peers first, the no-LoRA baseline last
        jobs = [(s, n) for n in cfg.ns for s in ["npc-sidecar", *peers]] + [("npc-sidecar-no-lora", n) for n in cfg.ns]
    data = {"scenario": "multi-npc", "model": str(model), "tokens": cfg.tokens, "rank": cfg.rank,
            "machine": machine_description(), "skipped_peers": skipped, "results": []}
    described = cfg.on_gpu or cfg.model_shape is not None
    if described:
        prompts = _prompts(model, max(cfg.ns))
        data.update(device=cfg.device, weights=cfg.resolved_weights, model_shape=cfg.model_shape,
                    random_weights=cfg.model_shape is not None, libraries=_versions(),
                    prompt_tokens_mean=sum(map(len, prompts)) / len(prompts),
                    run_timeout_s=cfg.run_timeout, time_budget_s=cfg.time_budget, failed=[])
        if cfg.model_shape is not None:

            from sidecar.bench.random_model import get_shape

            shape = get_shape(cfg.model_shape)
            data["shape"] = shape.summary()
        if cfg.on_gpu:
            data["gpu"] = gpu_description(cfg.device)
    failed: list[dict] = []
    for system, n in tqdm(jobs, desc="multi-npc bench", unit="run"):
        timeout = cfg.run_timeout
        if cfg.time_budget is not None:
            left = cfg.time_budget - (time.monotonic() - started)
            if left < _MIN_RUN_S:
                tqdm.write(f"{system} n={n} not run: the time budget ({cfg.time_budget:.4g} s) is spent")
                failed.append({"system": system, "n": n, "error": "not run: time budget spent"})
                continue
            timeout = left if timeout is None else min(timeout, left)
        result, error = _run_one(cfg, model, adapters, system, n, timeout, data["results"])
        if result is None:
            failed.append({"system": system, "n": n, "error": error})
        else:
            data["results"].append(result)
            r = result
            gpu = f"  GPU {r['gpu_mem_mb']:6.0f} MB" if "gpu_mem_mb" in r else ""
            tqdm.write(f"{system:>20} n={n:<3} {r['tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.0f} ms  "
                       f"ITL p50 {r['itl_p50_ms']:6.1f} ms  RSS {r['rss_mb']:5.0f} MB{gpu}")
            data["agreement"] = compare(data["results"])
            for e in data["agreement"]:
                if e["peer"] == system and e["n"] == n:
                    tqdm.write(f"{'':>20} tokens: {'verified' if e['verified'] else 'NOT VERIFIED: ' + e['why']}")
        if described or failed:
            data["failed"] = failed
        _write(cfg, data)  # after every run: a bench killed later still leaves what it measured
    print(_markdown(data))
    return data


def _write(cfg: MultiNpcConfig, data: dict) -> None:
    if cfg.json_path:
        cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_path.write_text(to_json(data))
    write_report(cfg.out_dir, cfg.report_name, data, _markdown(data), lambda path: _plot(path, data))


def _markdown(data: dict) -> str:
    if "device" in data:
        return gpu_markdown(data)
    rows = []
    ratio = _ratios(data)
    for r in data["results"]:
        rows.append([r["system"], r["n"], f"{r['tok_s']:.0f}", f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p95_ms']:.0f}",
                     f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}", f"{r['rss_mb']:.0f}", ratio(r)])
    header = ["system", "N", "tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p99 ms", "peak RSS MB",
              "npc-sidecar / this"]
    m = data["machine"]
    text = (_unverified_note(data) + f"Multi-NPC: N NPCs at once, each with its own rank-{data['rank']} LoRA "
            f"(q,k,v,o,gate,up,down), ~150-token persona + a player line, {data['tokens']} new tokens each. "
            f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}.\n\n" + markdown_table(header, rows))
    text += _warm_note(data) + _agreement_section(data)
    if data["skipped_peers"]:
        text += f"\n\nNot installed, skipped: {', '.join(data['skipped_peers'])}."
    if data.get("failed"):
        text += "\n\nFailed: " + "; ".join(f"{f['system']} N={f['n']} ({f['error']})" for f in data["failed"]) + "."
    return text


def _ratios(data: dict) -> Callable[[dict], str]:
    """The table's last column: npc-sidecar's tok/s over the row's, against a peer only where the peer's
    scoring verified that both produced the same replies (agreement.py); a refused ratio says so."""
    by = {(r["system"], r["n"]): r for r in data["results"]}
    entries = compare(data["results"])

    def ratio(r: dict) -> str:
        ours = by.get(("npc-sidecar", r["n"]))
        if not ours or r["system"] == "npc-sidecar":
            return "-"
        if r["system"] in PEERS and not verified(entries, r["system"], r["n"]):
            return "**unverified**"
        return f"{ours['tok_s'] / r['tok_s']:.2f}x"

    return ratio


def unverified(data: dict) -> list[dict]:
    """The peer runs whose scoring did not verify the sidecar's replies (no speed ratio is reported for them)."""
    return [e for e in compare(data["results"]) if not e["verified"]]


def _unverified_note(data: dict) -> str:
    bad = unverified(data)
    if not bad:
        return ""
    return "".join(f"> **UNVERIFIED**: against {e['peer']} at N={e['n']}: {e['why']}. No speed ratio is reported "
                   "against it.\n\n" for e in bad)


def _agreement_section(data: dict) -> str:
    section = agreement_markdown(compare(data["results"]))
    return f"\n\n{section}" if section else ""


def _warm_note(data: dict) -> str:
    warm = [r for r in data["results"] if "ttft_warm_ms" in r]
    if not warm:
        return ""
    w = warm[0]
    return (f"\n\nPersona prefix cache (npc-sidecar, one NPC alone): cold TTFT {w['ttft_cold_ms']:.0f} ms, "
            f"warm TTFT {w['ttft_warm_ms']:.0f} ms ({w['ttft_warm_ms'] / w['ttft_cold_ms']:.2f}x).")


def _model_line(data: dict) -> str:
    shape = data.get("shape")
    if not shape:
        return f"Model: `{data['model']}`."
    scaling = shape.get("rope_scaling") or {}
    rope = f", RoPE theta {shape['rope_theta']:g}" + (f" with {scaling.get('rope_type')} scaling" if scaling else "")
    n = shape["parameters"]
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    return (f"Model: **random weights** in the shape `{data['model_shape']}` ({size} "
            f"parameters: hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
            f"{shape['num_layers']} layers, {shape['num_heads']} heads / {shape['num_kv_heads']} KV heads of "
            f"{shape['head_dim']}, vocab {shape['vocab_size']}{rope}, tied embeddings; bf16), written by "
            "sidecar/bench/random_model.py because no weights can be downloaded there. The figures measure speed "
            "only: the generated text is meaningless, and every system generates exactly the same number of "
            "tokens (EOS ignored).")


def gpu_markdown(data: dict) -> str:
    """gpu.md (and a CPU run with --model-shape): the table plus the GPU, versions, model and any failures."""
    gpu = data.get("gpu")
    libs = data.get("libraries", {})
    m = data["machine"]
    lines = ["# Multi-NPC benchmark on a GPU" if gpu else "# Multi-NPC benchmark (random-weight model)", ""]
    if note := _unverified_note(data):
        lines += [note.rstrip(), ""]
    if gpu:
        driver = f", driver {gpu['driver']}" if gpu.get("driver") else ""
        memory = f", {gpu['memory_gib']} GiB" if gpu.get("memory_gib") else ""
        lines.append(f"GPU: **{gpu['name']}**{memory}{driver}; torch {gpu['torch']} (CUDA {gpu['cuda']}); "
                     f"host {m['cpu']}, {m['cores']} cores; {m['date']}.")
    else:
        lines.append(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}.")
    lines += ["", _model_line(data), ""]
    hf = f"transformers {libs.get('transformers')} + PEFT {libs.get('peft')}"
    dtype = "bf16" if gpu else "float32"
    lines.append(f"Workload: N NPCs at once, each with its own rank-{data['rank']} LoRA (q,k,v,o,gate,up,down), "
                 f"a persona + player-line chat prompt of {data.get('prompt_tokens_mean', 0):.0f} tokens on average, "
                 f"{data['tokens']} new tokens each, all submitted at once. npc-sidecar: weights "
                 f"{data.get('weights')} on {data.get('device')}; npc-sidecar-no-lora: the same without adapters; "
                 f"hf-peft: {hf}, base model in {dtype}, one mixed-adapter `generate` (PEFT's own defaults "
                 "otherwise). Each (system, N) runs in its own process; loading and a warm-up are not timed.")
    rows = []
    ratio = _ratios(data)
    for r in sorted(data["results"], key=lambda r: (r["n"], SYSTEMS.index(r["system"]))):
        mem = f"{r['gpu_mem_mb']:.0f}" if "gpu_mem_mb" in r else "-"
        rows.append([r["system"], r["n"], f"{r['tok_s']:.0f}", f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p95_ms']:.0f}",
                     f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}", mem, f"{r['rss_mb']:.0f}", ratio(r)])
    header = ["system", "N", "tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p99 ms", "peak GPU MB",
              "peak RSS MB", "npc-sidecar / this"]
    lines += ["", markdown_table(header, rows) if rows else "No run finished."]
    text = "\n".join(lines) + _warm_note(data) + _agreement_section(data)
    if data.get("failed"):
        text += "\n\nDid not finish: " + "; ".join(f"{f['system']} N={f['n']} ({f['error']})"
                                                   for f in data["failed"]) + "."
    if data["skipped_peers"]:
        why = "not installed, or llama.cpp on a GPU (its peer is a CPU build)" if gpu else "not installed"
        text += f"\n\nSkipped peers ({why}): {', '.join(data['skipped_peers'])}."
    limits = [f"{k} {data[k + '_s']:.4g} s" for k in ("run_timeout", "time_budget") if data.get(k + "_s")]
    if limits:
        text += f"\n\nLimits: {', '.join(limits).replace('_', ' ')}."
    if gpu:
        text += "\n\nReproduce on a GPU machine: `bash sidecar/bench/gpu/gpu_check.sh` (see that script)."
    return text


def _plot(path: Path, data: dict) -> None:
    plt = pyplot()

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
    if data["results"]:
        left.legend()
    fig.suptitle(_plot_title(data))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_title(data: dict) -> str:
    if "device" not in data:
        return CPU_PLOT_TITLE
    where = (data.get("gpu") or {}).get("name") or f"{data['machine']['cores']}-core CPU"
    model = f"random {data['model_shape']}" if data.get("model_shape") else Path(data["model"]).name
    return f"Multi-NPC, {model} ({data['weights']}) + rank-{data['rank']} LoRA per NPC, {where}"


def main() -> None:
    p = argparse.ArgumentParser(description="one multi-npc bench run (used by npc bench)")
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--adapters", required=True, help="folder holding npc0, npc1, ... (prepare())")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", default="auto")
    p.add_argument("--score", help="peers: JSON file {system: token ids per NPC} to score after the timed run")
    a = p.parse_args()
    score = json.loads(Path(a.score).read_text()) if a.score else None
    print(json.dumps(worker(a.system, Path(a.model), Path(a.adapters), a.n, a.tokens, a.device, a.weights, score)))


if __name__ == "__main__":
    main()
