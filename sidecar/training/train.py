"""`npc train CHARACTER_DIR`: a LoRA persona adapter from the character's dialogue.jsonl, with PEFT.

The base is the model the sidecar serves: transformers loads the same GGUF (dequantized to
float32, so the values equal the served int4 weights) or the same Hugging Face folder. The
result is a standard PEFT folder (adapter_config.json + adapter_model.safetensors, bfloat16),
readable by the sidecar, PEFT, vLLM and TensorRT-LLM; character.yaml is pointed at it.
Everything is checked before training starts, and the adapter is written to a temporary folder
and renamed into place, so a bad run or a hot-reloading server never sees half a folder.

Memory: a step of `batch_size` conversations runs as micro-batches of at most `micro_tokens`
padded tokens each, gradients accumulated (the same update as one big batch, up to rounding), so
the activations kept for the backward pass are bounded by `micro_tokens`, not by batch size x the
longest conversation. Widths (and the rows sent through the output head) are padded to a multiple
of WIDTH_MULTIPLE so that the same few tensor shapes come back step after step: oneDNN and the CPU
attention kernel keep per-shape state for the life of the process (~15 MB per new shape here), and
glibc reuses freed blocks of sizes it has seen instead of growing its heap. Measured on blacksmith
with the defaults (54 steps): before, RSS was 5.1 GB after step 1 and grew to 7.2 GB (peak 7.5 GB),
of which 0.7 GB was in use after step 1 and 1.1 GB at the end (per-width caches), the rest freed
activations glibc kept; now it stays at 2.6-2.9 GB (peak 3.0 GB), at the same speed.

Speed: every conversation starts with the same persona block (~350 of its ~500 tokens), so the rows
of a micro-batch run their common prefix once and reuse its keys and values (`_shared_prefix`);
the loss and gradients are those of running each row alone. Measured on blacksmith (one process
timing `_accumulate_gradients` over its first 32 conversations in 8-conversation steps, with and
without the shared prefix; Intel Xeon, 2 threads): 10.1 s per step before, 5.5 s after.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from sidecar.dialogue.characters import CHARACTER_FILE, load_character
from sidecar.engine.tokenizer import Tokenizer
from sidecar.errors import UserError
from sidecar.figures import FiguresUnavailable, pyplot
from sidecar.model.checkpoint import load_checkpoint
from sidecar.training.data import (
    DIALOGUE_FILE,
    IGNORE,
    Conversation,
    Example,
    character_retriever,
    read_dialogue,
    render,
    split,
)

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REPORT_DIR = "training"  # next to the adapter: report.json + loss.png
RUN_FIELDS = ("config", "train_loss", "held_out_loss", "seconds")  # what report.json keeps of each earlier run
WIDTH_MULTIPLE = 32  # batches are padded to a multiple of this many tokens (few distinct shapes)


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_MODULES
    epochs: int = 3
    learning_rate: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    held_out: float = 0.1
    max_tokens: int = 1024  # longest rendered conversation accepted
    max_steps: int | None = None  # stop early (smoke tests)
    micro_tokens: int = 1024  # padded tokens per forward/backward (bounds activation memory)
    label_weight: float = 4.0  # loss weight of the emotion label and action tokens (text: 1); docs/characters.md
    fact_weight: float = 1.0  # loss weight of reply tokens copied from the facts block (Example.copied)
    adapter_dir: str = "adapter"
    # Continue from this adapter folder of the character (its rank, alpha and targets, and the held-out
    # lines of the training that wrote it) instead of a fresh LoRA: new lines without a full retraining.
    continue_from: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 256:
            raise UserError(f"--rank must be 1-256, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(f"--alpha must be > 0, got {self.alpha}")
        if unknown := set(self.targets) - set(ALL_MODULES):
            raise UserError(f"--targets: unknown module(s) {sorted(unknown)}; choose from {', '.join(ALL_MODULES)}")
        if not self.targets:
            raise UserError("--targets: name at least one module")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("--epochs and --batch-size must be at least 1")
        for flag, weight in (("--label-weight", self.label_weight), ("--fact-weight", self.fact_weight)):
            if not (math.isfinite(weight) and weight > 0):
                raise UserError(f"{flag} must be > 0, got {weight}")
        if self.micro_tokens < 1:
            raise UserError(f"micro_tokens must be at least 1, got {self.micro_tokens}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"--lr must be > 0, got {self.learning_rate}")
        for flag, name in (("--out", self.adapter_dir), ("--continue", self.continue_from)):
            if name is not None and ("/" in name or name in ("", ".", "..")):
                raise UserError(f"{flag} must be a plain folder name inside the character folder, got {name!r}")


@dataclass(frozen=True)
class TrainResult:
    adapter: Path
    report: Path
    train_lines: int
    held_out_lines: int
    final_train_loss: float
    held_out_loss: float | None
    seconds: float


def load_hf_model(model_path: Path):
    """transformers + the same weights the sidecar serves, in float32."""
    from transformers import AutoModelForCausalLM

    if model_path.is_dir():
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, dtype=torch.float32)


def train_character(folder: Path, model_path: Path, config: TrainConfig, progress: bool = True) -> TrainResult:
    started = time.perf_counter()
    character = load_character(folder)
    conversations = read_dialogue(folder / DIALOGUE_FILE)
    tokenizer = Tokenizer(load_checkpoint(model_path))
    if config.continue_from:
        config = _continued_config(folder, config)
    # Render everything first: bad data stops here, before anything is written.
    earlier = _continued_report(folder, config)
    train_convs, held_convs = _split(conversations, config, earlier)
    retriever = character_retriever(folder)
    train_set = [e for c in train_convs for e in render(tokenizer, character, c, config.max_tokens, retriever)]
    held_set = [e for c in held_convs for e in render(tokenizer, character, c, config.max_tokens, retriever)]

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(config.seed)
    base = load_hf_model(model_path)
    model = get_peft_model(base, LoraConfig(r=config.rank, lora_alpha=config.alpha,
                                            target_modules=list(config.targets), lora_dropout=0.0, bias="none",
                                            task_type="CAUSAL_LM"))
    if config.continue_from:
        # (PEFT's from_pretrained would look the base model's name up online; the weights are all we need.)
        saved = load_file(folder / config.continue_from / "adapter_model.safetensors")
        try:
            misfit = set_peft_model_state_dict(model, {k: v.float() for k, v in saved.items()}).unexpected_keys
        except RuntimeError:  # a tensor of another shape: an adapter of another base model
            misfit = True
        if misfit:
            raise UserError(f"--continue {config.continue_from}: its weights do not fit {model_path.name}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))

    losses: list[float] = []
    held_losses: list[tuple[int, float]] = []
    rng = random.Random(config.seed)
    bar = tqdm(total=total, desc=f"training {character.id}", unit="step", disable=not progress)
    step = 0
    model.train()
    for _ in range(config.epochs):
        order = list(train_set)
        rng.shuffle(order)
        for i in range(0, len(order), config.batch_size):
            if step >= total:
                break
            losses.append(_accumulate_gradients(model, order[i:i + config.batch_size], config.micro_tokens,
                                                config.label_weight, config.fact_weight))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if held_set:
            held_losses.append((step, _mean_loss(model, held_set, config.batch_size, config.micro_tokens)))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", held_out=f"{held_losses[-1][1]:.3f}")
    bar.close()

    adapter = _save_adapter(model, folder, config.adapter_dir, model_path)
    seconds = time.perf_counter() - started
    report = _write_report(folder, character.id, model_path, config, train_convs, held_convs, losses, held_losses,
                           seconds, earlier)
    _point_yaml_at(folder / CHARACTER_FILE, config.adapter_dir)
    return TrainResult(adapter, report, len(train_convs), len(held_convs), losses[-1] if losses else float("nan"),
                       held_losses[-1][1] if held_losses else None, seconds)


def _continued_config(folder: Path, config: TrainConfig) -> TrainConfig:
    """`config` with the rank, alpha and targets of the adapter it continues, which must exist."""
    path = folder / str(config.continue_from) / "adapter_config.json"
    try:
        saved = json.loads(path.read_text())
        return replace(config, rank=int(saved["r"]), alpha=float(saved["lora_alpha"]),
                       targets=tuple(sorted(saved["target_modules"], key=ALL_MODULES.index)))
    except FileNotFoundError:
        raise UserError(f"--continue {config.continue_from}: {path} not found (train an adapter first)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--continue {config.continue_from}: {path} is not a PEFT LoRA config ({e})") from None


def _continued_report(folder: Path, config: TrainConfig) -> dict:
    """The report.json of the training that wrote the adapter `--continue` starts from; {} for a fresh training
    (or a report of another adapter folder)."""
    report = folder / REPORT_DIR / "report.json"
    if not config.continue_from or not report.is_file():
        return {}
    earlier = json.loads(report.read_text())
    return earlier if earlier["config"].get("adapter_dir") == config.continue_from else {}


def recorded_sides(report: dict, conversations: list[Conversation]) -> tuple[list[Conversation], list[Conversation]]:
    """(trained, held out): the conversations on each side of the split of the training that wrote `report`,
    matched by content, so a line that an insertion above it renumbered keeps its side (an edited line counts
    as new, on neither); by line number for reports written before content digests."""
    by, key = ("digests", lambda c: c.digest) if "held_out_digests" in report else ("lines", lambda c: c.line)
    held = set(report[f"held_out_{by}"])
    trained = set(report[f"train_{by}"]) - held
    return [c for c in conversations if key(c) in trained], [c for c in conversations if key(c) in held]


def _split(conversations: list[Conversation], config: TrainConfig, earlier: dict
           ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held out). Continuing an adapter keeps the sides of the training that wrote it (`earlier`, its
    report.json), so `npc eval` never scores a line the adapter has learned; lines added since are split as
    usual."""
    if not earlier:
        return split(conversations, config.held_out, config.seed)
    trained, held = recorded_sides(earlier, conversations)
    seen = {id(c) for c in trained + held}
    new = [c for c in conversations if id(c) not in seen]
    new_train, new_held = split(new, config.held_out, config.seed) if new else ([], [])
    return sorted(trained + new_train, key=lambda c: c.line), sorted(held + new_held, key=lambda c: c.line)


def _padded_width(n: int) -> int:
    return -(-n // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def _micro_batches(examples: list[Example], micro_tokens: int) -> list[list[Example]]:
    """`examples` longest first, cut into groups that cost at most `micro_tokens` padded tokens each
    (a longer conversation goes alone). A group's cost counts its shared prefix once (see
    `_shared_prefix`) plus each row's padded rest. Sorting keeps rows of similar length together (less
    padding), and padded widths keep the shapes few."""
    groups: list[list[Example]] = []
    for e in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        if groups and _cost(groups[-1] + [e]) <= micro_tokens:
            groups[-1].append(e)
        else:
            groups.append([e])
    return groups


def _shared_prefix(examples: list[Example]) -> int:
    """How many leading tokens every row of `examples` has in common (the persona block of the system
    prompt, ~80% of a conversation's tokens), rounded down to WIDTH_MULTIPLE and stopping before the
    first position whose output a label needs. That prefix runs through the model once per group
    instead of once per row; the result is the same, since no row attends to anything but itself."""
    if len(examples) < 2:
        return 0
    first = examples[0].input_ids
    shared = min(len(e.input_ids) for e in examples)
    for e in examples[1:]:
        shared = next((i for i, (a, b) in enumerate(zip(first, e.input_ids[:shared], strict=False)) if a != b), shared)
    # Position p predicts token p + 1: the prefix's own outputs are never scored.
    shared = min([shared] + [next(i for i, t in enumerate(e.labels) if t != IGNORE) - 1
                             for e in examples if e.supervised])
    return max(0, shared) // WIDTH_MULTIPLE * WIDTH_MULTIPLE


def _cost(examples: list[Example]) -> int:
    shared = _shared_prefix(examples)
    return shared + len(examples) * _padded_width(max(len(e.input_ids) for e in examples) - shared)


def _batch(examples: list[Example], shared: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels of the rows after their `shared` prefix, WIDTH_MULTIPLE wide, and
    the attention mask over prefix + rest (padding has no loss and is never attended to)."""
    width = _padded_width(max(len(e.input_ids) for e in examples) - shared)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), shared + width, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids) - shared
        ids[row, :n] = torch.tensor(e.input_ids[shared:])
        mask[row, :shared + n] = 1
        labels[row, :n] = torch.tensor(e.labels[shared:])
    return ids, mask, labels


def _loss_sum(model, examples: list[Example], label_weight: float = 1.0, fact_weight: float = 1.0) -> torch.Tensor:
    """Summed cross-entropy over the supervised tokens of `examples`, as transformers computes it, but
    faster on CPU: the rows' shared prefix runs once and its keys and values are repeated for every
    row; matmuls run in bfloat16 (autocast; LoRA weights, gradients and the optimizer stay float32);
    and the 49152-wide output head runs only at the positions that have a label (~15% of them),
    padded to a multiple of WIDTH_MULTIPLE rows (copies of position 0, without a label) so that its
    shape repeats too. With `label_weight`, the structured tokens' loss (Example.structured) counts
    that many times; with `fact_weight`, that of the tokens copied from the facts (Example.copied)."""
    shared = _shared_prefix(examples)
    ids, mask, labels = _batch(examples, shared)
    targets = labels[:, 1:]
    row, pos = (targets != IGNORE).nonzero(as_tuple=True)
    n = len(row)
    row, pos = (torch.nn.functional.pad(t, (0, _padded_width(n) - n)) for t in (row, pos))
    picked = targets[row, pos]
    picked[n:] = IGNORE
    body = model.base_model.model.model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = None
        if shared:
            prefix = torch.tensor([examples[0].input_ids[:shared]])
            cache = body(input_ids=prefix, use_cache=True).cache
            cache.batch_repeat_interleave(len(examples))
        hidden = body(input_ids=ids, attention_mask=mask, cache=cache, use_cache=shared > 0).last_hidden_state
        logits = model.base_model.model.lm_head(hidden[row, pos])
    losses = torch.nn.functional.cross_entropy(logits.float(), picked, reduction="none")
    if label_weight != 1.0 or fact_weight != 1.0:
        weights = torch.ones(len(picked))
        for k, (r, q) in enumerate(zip(row[:n].tolist(), pos[:n].tolist(), strict=True)):
            at = shared + q + 1  # position q of the rest predicts token shared + q + 1
            if at in examples[r].structured:
                weights[k] = label_weight
            elif at in examples[r].copied:
                weights[k] = fact_weight
        losses = losses * weights
    return losses.sum()


def _accumulate_gradients(model, examples: list[Example], micro_tokens: int, label_weight: float = 1.0,
                          fact_weight: float = 1.0) -> float:
    """Backward of the batch's mean loss over its supervised tokens, one micro-batch at a time (the
    gradients add up to the full batch's); returns that mean loss as a plain float."""
    count = sum(e.supervised for e in examples)
    total = 0.0
    for group in _micro_batches(examples, micro_tokens):
        loss = _loss_sum(model, group, label_weight, fact_weight) / max(count, 1)
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def _mean_loss(model, examples: list[Example], batch_size: int, micro_tokens: int) -> float:
    """Token-weighted mean loss over the supervised tokens of `examples`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        for group in _micro_batches(examples[i:i + batch_size], micro_tokens):
            total += _loss_sum(model, group).item()
            count += sum(e.supervised for e in group)
    model.train()
    return total / max(count, 1)


def _save_adapter(model, folder: Path, name: str, model_path: Path) -> Path:
    target = folder / name
    tmp = folder / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16)  # half the file; the sidecar computes LoRA in bf16 / fp32 anyway
    model.save_pretrained(tmp, safe_serialization=True)
    cfg_path = tmp / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = model_path.name  # a name, not this machine's path
    if isinstance(cfg.get("target_modules"), list):  # PEFT writes a set's order, which changes from run to run
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub says nothing true about this adapter
    old = folder / f".{name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _write_report(folder: Path, cid: str, model_path: Path, config: TrainConfig, train_convs, held_convs,
                  losses: list[float], held_losses: list[tuple[int, float]], seconds: float,
                  earlier: dict | None = None) -> Path:
    """report.json and loss.png in folder/training. A continued training keeps the runs before it
    (`earlier_runs`, oldest first) and plots their curves ahead of its own."""
    out = folder / REPORT_DIR
    out.mkdir(exist_ok=True)
    runs = [*earlier.get("earlier_runs", []), {k: earlier[k] for k in RUN_FIELDS}] if earlier else []
    report = {
        "character": cid, "model": model_path.name, "config": {**asdict(config), "targets": list(config.targets)},
        "train_lines": [c.line for c in train_convs], "held_out_lines": [c.line for c in held_convs],
        "train_digests": [c.digest for c in train_convs], "held_out_digests": [c.digest for c in held_convs],
        "train_loss": losses, "held_out_loss": [{"step": s, "loss": v} for s, v in held_losses],
        "seconds": round(seconds, 1), "torch": torch.__version__, "earlier_runs": runs,
    }
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=1))
    try:
        _plot(out / "loss.png", cid, [*runs, report])
    except FiguresUnavailable as e:  # the PNG is for people; the adapter and report.json are what counts
        (out / "loss.png").unlink(missing_ok=True)  # an older run's curve would not be this run's
        print(f"npc train: loss-curve PNG skipped: {e}", file=sys.stderr)
    return path


def _plot(path: Path, cid: str, runs: list[dict]) -> None:
    """The runs' curves one after another (each continued run's steps after the last one's), a dashed line
    where one was continued."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    start = 0
    for i, run in enumerate(runs):
        losses, held = run["train_loss"], [(h["step"], h["loss"]) for h in run["held_out_loss"]]
        first = i == 0
        if not first:
            ax.axvline(start + 0.5, color="grey", linestyle="--", linewidth=1,
                       label="continued" if i == 1 else None)
        ax.plot(range(start + 1, start + len(losses) + 1), losses, color="C0", linewidth=1,
                label="train (per step)" if first else None)
        if held:
            ax.plot([start + s for s, _ in held], [v for _, v in held], "o-", color="C1",
                    label="held out (per epoch)" if first else None)
        start += len(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / reply token)")
    ax.set_title(f"npc train {cid}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _point_yaml_at(yaml_path: Path, adapter_dir: str) -> None:
    """Sets `adapter: <dir>` in character.yaml, keeping the rest of the file (and its comments) as written."""
    lines = yaml_path.read_text(encoding="utf-8").splitlines(keepends=True)
    entry = f"adapter: {adapter_dir}\n"
    for i, line in enumerate(lines):
        if line.startswith("adapter:"):
            lines[i] = entry
            break
    else:
        at = next((i + 1 for i, line in enumerate(lines) if line.startswith("name:")), len(lines))
        lines.insert(at, entry)
    yaml_path.write_text("".join(lines), encoding="utf-8")
