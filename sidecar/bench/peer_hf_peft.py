"""Peer for `npc bench --scenario multi-npc`: transformers + PEFT serving N NPCs in one mixed-adapter batch.

This is what a Hugging Face user would write: one base model, every adapter loaded into one
`PeftModel`, the N prompts left-padded into one batch, and `generate(..., adapter_names=[...])` so
each row uses its own adapter. Loading (and a short warm-up) happen before the clock starts; every
request counts as submitted at that moment, because the NPCs all speak at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from sidecar.bench.timing import RequestTiming

PAD_ID = 2


class _StepClock(BaseStreamer):
    """Stamps the wall time each decoding step's tokens reach the host, and keeps the tokens.

    `generate` first hands the streamer the (2-D) prompt before the prefill; that call is skipped so
    the first stamp is the first generated token and TTFT includes the prefill. Later calls carry
    one 1-D tensor of next tokens per step, made after that step's forward and argmax.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.steps: list[list[int]] = []

    def put(self, value: torch.Tensor) -> None:
        if value.dim() != 1:
            return
        self.times.append(time.perf_counter())
        self.steps.append(value.tolist())

    def end(self) -> None:
        pass


def load_hf_peft(model_path: Path, adapter_dirs: list[Path], dtype: torch.dtype = torch.float32,
                 device: str = "cpu"):
    """The base model (a GGUF file, dequantized by transformers, or a Hugging Face folder) on `device`,
    wrapped in one PeftModel holding adapters npc0..npcN-1.

    `low_cpu_mem_usage` makes PEFT create each adapter's layers empty and fill them from the file
    instead of initializing them first: the same weights, loaded faster (128 adapters on a 1B model).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if Path(model_path).is_dir():
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=dtype)
    base = base.to(device).eval()
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name="npc0", low_cpu_mem_usage=True)
    for i, folder in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(folder, adapter_name=f"npc{i}", low_cpu_mem_usage=True)
    return model.eval()


def left_pad(prompts: list[list[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), rows right-aligned so every row's next token lands in the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def generate_hf_peft(model, prompts: list[list[int]], max_new_tokens: int,
                     adapter_names: list[str] | None = None) -> tuple[list[RequestTiming], list[list[int]]]:
    """One greedy mixed-adapter `generate` over all prompts: per-request timings and generated token ids.

    `adapter_names` defaults to npc0..npcN-1 (row i uses adapter i); "__base__" means no adapter.
    Exactly `max_new_tokens` per row (EOS suppressed by `min_new_tokens`), so every system decodes
    the same amount. All rows come from one `generate`, so they share their token times.
    """
    names = adapter_names if adapter_names is not None else [f"npc{i}" for i in range(len(prompts))]
    device = next(model.parameters()).device
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts))
    clock = _StepClock()
    submitted = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, adapter_names=names,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=PAD_ID, streamer=clock)
    if len(clock.times) != max_new_tokens:
        raise RuntimeError(f"expected {max_new_tokens} decoding steps, saw {len(clock.times)}")
    tokens = out[:, input_ids.shape[1]:].tolist()
    if tokens != [list(row) for row in zip(*clock.steps, strict=True)]:
        raise RuntimeError("streamed tokens differ from the returned sequences")
    timings = [RequestTiming(submitted=submitted, token_times=list(clock.times)) for _ in prompts]
    return timings, tokens


def score_hf_peft(model, prompts: list[list[int]], sequences: list[list[int]],
                  adapter_names: list[str] | None = None) -> list[list[float]]:
    """Another system's tokens under this model: for row i, `sequences[i]` after `prompts[i]` with adapter i
    (teacher forcing, one row at a time, no padding), and at each step how far below the best logit the
    given token's is (0 where greedy decoding here would have chosen it too)."""
    names = adapter_names if adapter_names is not None else [f"npc{i}" for i in range(len(prompts))]
    device = next(model.parameters()).device
    gaps = []
    with torch.inference_mode():
        for prompt, tokens, name in zip(prompts, sequences, names, strict=True):
            if not tokens:
                gaps.append([])
                continue
            ids = torch.tensor([prompt + tokens[:-1]], device=device)
            # Only the positions that predict `tokens`: the last len(tokens) of the input.
            logits = model(input_ids=ids, adapter_names=[name], logits_to_keep=len(tokens)).logits[0].float()
            chosen = logits.gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0]
            gaps.append((logits.max(-1).values - chosen).tolist())
    return gaps


def run_hf_peft(model_path: Path, adapter_dirs: list[Path], prompts: list[list[int]], max_new_tokens: int,
                dtype: torch.dtype = torch.float32, warmup: bool = True, device: str = "cpu",
                score: dict[str, list[list[int]]] | None = None,
                ) -> tuple[list[RequestTiming], list[list[int]], dict[str, list[list[float]]]]:
    """Time transformers + PEFT serving prompt i with adapter i, all in one batch; loading is not timed.

    `warmup` runs a 2-token generate on the same batch first: the first `generate` in a process pays
    one-time setup (kernel selection, allocations) that a long-running server would not, and it would
    land in TTFT. On a GPU every step's tokens are copied to the host by the timing streamer, so each
    stamp is taken after that step's kernels finished. Returns the timings, the generated token ids
    and, after the timed part, score_hf_peft's gaps for each system's tokens in `score`.
    """
    if len(adapter_dirs) != len(prompts):
        raise ValueError(f"{len(adapter_dirs)} adapters for {len(prompts)} prompts")
    model = load_hf_peft(model_path, adapter_dirs, dtype, device)
    if warmup:
        generate_hf_peft(model, prompts, max_new_tokens=2)
    timings, tokens = generate_hf_peft(model, prompts, max_new_tokens)
    gaps = {system: score_hf_peft(model, prompts, seqs) for system, seqs in (score or {}).items()}
    return timings, tokens, gaps
