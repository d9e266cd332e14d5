"""llama.cpp as a multi-NPC peer: one base model, one GGUF LoRA per NPC, requests served one at a time.

llama.cpp applies LoRA adapters per context, not per sequence, so N NPCs with N different adapters
cannot share a batch: the best it can do is switch the active adapter between requests. This module
converts the workload's PEFT folders into llama.cpp's GGUF adapter format (our own converter, so the
benchmark needs no llama.cpp checkout) and times that serial schedule through llama-cpp-python.

GGUF LoRA adapter format, as llama.cpp's loader reads it:
  * metadata: general.architecture (must equal the base model's, "llama"), general.type = "adapter",
    adapter.type = "lora", adapter.lora.alpha (float32; the runtime scale is alpha / rank, with rank
    taken from each lora_b's shape, or 1 when alpha is 0);
  * tensors: "<base tensor name>.lora_a" and ".lora_b" per adapted matrix, e.g. blk.3.attn_q.weight.lora_a;
  * orientation: numpy lora_a is PEFT's A as is, [rank, in] (ggml ne = [in, rank]); numpy lora_b is PEFT's
    B as is, [out, rank] (ggml ne = [rank, out]). The base matrix has ggml ne = [in, out].
q and k rows are stored permuted for llama.cpp's RoPE layout, so B's rows get the same permutation.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sidecar.bench.timing import RequestTiming
from sidecar.model.config import LlamaConfig
from sidecar.model.lora import module_shapes, pattern_value

# PEFT module name -> llama.cpp tensor name inside blk.{i}.
_GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_PEFT_TENSOR = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias")


def _rope_permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the output rows the way llama.cpp's converter reorders q/k weights (halves -> interleaved)."""
    out, rank = b.shape
    return b.reshape(n_head, 2, out // n_head // 2, rank).swapaxes(1, 2).reshape(out, rank)


def convert_peft_to_gguf_lora(adapter_dir: Path, config: LlamaConfig, out_path: Path) -> Path:
    """Write a PEFT LoRA folder as a llama.cpp GGUF adapter (F32), so llama.cpp serves the same adapter.

    PEFT's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA, per-module alpha/rank patterns) is mapped onto
    llama.cpp's single alpha / rank: the written alpha reproduces the adapter-wide scale, and any module whose
    scale differs has the ratio folded into its lora_b.
    """
    import gguf

    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for option in _UNSUPPORTED_OPTIONS:
        if cfg.get(option):
            raise ValueError(f"{adapter_dir}: {option} adapters have no llama.cpp GGUF equivalent")
    if cfg.get("fan_in_fan_out"):
        raise ValueError(f"{adapter_dir}: fan_in_fan_out adapters are not Llama adapters")
    if cfg.get("modules_to_save"):
        raise ValueError(f"{adapter_dir}: modules_to_save (fully trained modules) cannot be stored as LoRA")

    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern: dict[str, int] = cfg.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}

    def peft_scale(r: int, a: float) -> float:
        return a / (math.sqrt(r) if rslora else r)

    # llama.cpp multiplies by written_alpha / rank: pick written_alpha so the default module needs no folding.
    written_alpha = peft_scale(rank, alpha) * rank

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"), device="cpu")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        m = _PEFT_TENSOR.match(name)
        if m is None or m.group(2) not in _GGUF_NAMES:
            raise ValueError(f"{adapter_dir}: unsupported adapter tensor {name!r} (only layer projections)")
        layer = int(m.group(1))
        if layer >= config.num_layers:
            raise ValueError(f"{adapter_dir}: {name!r} is for layer {layer}, the model has {config.num_layers}")
        pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = tensor
    if not pairs:
        raise ValueError(f"{adapter_dir}: no LoRA tensors found")

    shapes = module_shapes(config)
    heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(adapter_dir.name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, written_alpha)
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: layer {layer} {module} lacks lora_{'A' if 'A' not in ab else 'B'}")
        a = ab["A"].to(torch.float32).numpy()
        b = ab["B"].to(torch.float32).numpy()
        out, inp = shapes[module]
        r = a.shape[0]
        if a.shape != (r, inp) or b.shape != (out, r):
            raise ValueError(f"{adapter_dir}: layer {layer} {module}: A {tuple(a.shape)} / B {tuple(b.shape)} "
                             f"do not fit a [{out}, {inp}] matrix")
        path = f"model.layers.{layer}.{'self_attn' if module in _ATTENTION else 'mlp'}.{module}"
        module_rank = int(pattern_value(rank_pattern, path, rank))
        if module_rank != r:
            raise ValueError(f"{adapter_dir}: {path} has rank {r}, adapter_config.json says {module_rank}")
        scale = peft_scale(r, float(pattern_value(alpha_pattern, path, alpha)))
        fold = scale * r / written_alpha if written_alpha else scale  # alpha 0 means "scale 1" in llama.cpp
        if fold != 1.0:
            b = b * np.float32(fold)
        if module in heads:
            b = _rope_permute_rows(b, heads[module])
        base = f"blk.{layer}.{_GGUF_NAMES[module]}.weight"
        writer.add_tensor(f"{base}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{base}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


class LlamaCppPeer:
    """One llama-cpp-python model with every NPC adapter loaded once; the active adapter is switched per request."""

    def __init__(self, model_path: Path, adapter_ggufs: Sequence[Path], n_ctx: int, threads: int | None = None,
                 logits_all: bool = False):
        import llama_cpp

        self._lib = llama_cpp
        self.logits_all = logits_all
        n_threads = threads or torch.get_num_threads()
        self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   n_threads=n_threads, n_threads_batch=n_threads, logits_all=logits_all,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.adapters: list[ctypes.c_void_p] = []
        try:
            for path in adapter_ggufs:
                handle = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
                if not handle:
                    raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path}")
                self.adapters.append(handle)
        except BaseException:
            self.close()
            raise
        self._active: int | None = None

    def use_adapter(self, index: int | None, scale: float = 1.0) -> None:
        """Make adapter `index` the only active one (None: the bare base model)."""
        lib = self._lib
        if index is None:
            rc = lib.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            handles = (lib.llama_adapter_lora_p_ctypes * 1)(self.adapters[index])
            scales = (ctypes.c_float * 1)(scale)
            rc = lib.llama_set_adapters_lora(self.llm.ctx, handles, 1, scales)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc}) for adapter {index}")
        self._active = index

    def _reset(self) -> None:
        """Forget the previous conversation: empty the KV cache and llama-cpp-python's token bookkeeping."""
        memory = self._lib.llama_get_memory(self.llm.ctx)
        if memory is not None:
            self._lib.llama_memory_clear(memory, True)
        self.llm.reset()

    def _last_logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prompt_logits(self, prompt: Sequence[int], adapter: int | None) -> np.ndarray:
        """Logits [T, V] for every prompt position (needs logits_all=True): the converter check uses these."""
        if not self.logits_all:
            raise RuntimeError("prompt_logits needs a LlamaCppPeer built with logits_all=True")
        self._reset()
        self.use_adapter(adapter)
        self.llm.eval(list(prompt))
        return np.array(self.llm.scores[: len(prompt)], dtype=np.float32)

    def generate(self, prompt: Sequence[int], adapter: int | None,
                 max_new_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy decode exactly max_new_tokens (EOS ignored); returns the ids and each token's perf_counter time."""
        ids, times, _ = self._decode(prompt, adapter, max_new_tokens)
        return ids, times

    def score(self, prompt: Sequence[int], tokens: Sequence[int], adapter: int | None) -> list[float]:
        """Decodes `tokens` after `prompt` as if it had chosen them, one step at a time like `generate`
        (so the same numerics): at each step, how far below its best logit the given token's is (0: its choice)."""
        return self._decode(prompt, adapter, len(tokens), forced=tokens)[2]

    def _decode(self, prompt: Sequence[int], adapter: int | None, steps: int,
                forced: Sequence[int] | None = None) -> tuple[list[int], list[float], list[float]]:
        """`steps` tokens after `prompt`: the argmax, or forced[step] when given. (ids, times, gaps); the
        gaps (best logit minus the token's) only when forced, so that a timed run does no extra work."""
        self._reset()
        self.use_adapter(adapter)
        self.llm.eval(list(prompt))
        ids: list[int] = []
        times: list[float] = []
        gaps: list[float] = []
        for step in range(steps):
            logits = self._last_logits()
            if forced is None:
                token = int(logits.argmax())
            else:
                token = int(forced[step])
                gaps.append(float(logits.max() - logits[token]))
            ids.append(token)
            times.append(time.perf_counter())
            if step + 1 < steps:
                self.llm.eval([token])
        return ids, times, gaps

    def close(self) -> None:
        """Detach and free the adapters before the model they belong to."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        if self.adapters and llm.ctx is not None:
            self._lib.llama_set_adapters_lora(llm.ctx, None, 0, None)
        for handle in self.adapters:
            self._lib.llama_adapter_lora_free(handle)
        self.adapters = []
        llm.close()
        self.llm = None

    def __enter__(self) -> LlamaCppPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _context_size(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    need = max((len(p) for p in prompts), default=1) + max_new_tokens
    return max(256, -(-need // 256) * 256)


def generate_llama_cpp(model_path: Path, adapter_ggufs: list[Path], prompts: list[list[int]], max_new_tokens: int,
                       threads: int | None = None, score: dict[str, list[list[int]]] | None = None,
                       ) -> tuple[list[RequestTiming], list[list[int]], dict[str, list[list[float]]]]:
    """Serve NPC i's prompt with adapter i, one request after another (llama.cpp cannot batch across adapters).

    Returns the timings, each request's greedy token ids and, after the timed part, for each system in
    `score` (its token ids per NPC) the gaps that LlamaCppPeer.score gives its tokens under adapter i.
    """
    if len(adapter_ggufs) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(adapter_ggufs)} adapters: one adapter per NPC")
    with LlamaCppPeer(model_path, adapter_ggufs, _context_size(prompts, max_new_tokens), threads) as peer:
        # Every NPC speaks at once: all requests are submitted when serving starts (after loading).
        submitted = time.perf_counter()
        timings: list[RequestTiming] = []
        tokens: list[list[int]] = []
        for i, prompt in enumerate(prompts):
            ids, times = peer.generate(prompt, i, max_new_tokens)
            timings.append(RequestTiming(submitted=submitted, token_times=times))
            tokens.append(ids)
        gaps = {system: [peer.score(prompt, ids, i) for i, (prompt, ids) in enumerate(zip(prompts, seqs, strict=True))]
                for system, seqs in (score or {}).items()}
    return timings, tokens, gaps
