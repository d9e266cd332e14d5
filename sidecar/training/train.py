"""`npc train CHARACTER_DIR`: a LoRA persona adapter from the character's dialogue.jsonl, with PEFT.

The base is the model the sidecar serves: transformers loads the same GGUF (dequantized to
float32, so the values equal the served int4 weights) or the same Hugging Face folder. The
result is a standard PEFT folder (adapter_config.json + adapter_model.safetensors, bfloat16),
readable by the sidecar, PEFT, vLLM and TensorRT-LLM; character.yaml is pointed at it.
Everything is checked before training starts, and the adapter is written to a temporary folder
and renamed into place, so a bad run or a hot-reloading server never sees half a folder.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sidecar.dialogue.characters import CHARACTER_FILE, load_character
from sidecar.engine.tokenizer import Tokenizer
from sidecar.errors import UserError
from sidecar.model.checkpoint import load_checkpoint
from sidecar.training.data import DIALOGUE_FILE, IGNORE, Example, read_dialogue, render, split

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REPORT_DIR = "training"  # next to the adapter: report.json + loss.png


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
    adapter_dir: str = "adapter"

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
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UserError(f"--lr must be > 0, got {self.learning_rate}")
        if "/" in self.adapter_dir or self.adapter_dir in ("", ".", ".."):
            raise UserError(f"--out must be a plain folder name inside the character folder, got {self.adapter_dir!r}")


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
    # Render everything first: bad data stops here, before anything is written.
    train_convs, held_convs = split(conversations, config.held_out, config.seed)
    train_set = [render(tokenizer, character, c, config.max_tokens) for c in train_convs]
    held_set = [render(tokenizer, character, c, config.max_tokens) for c in held_convs]

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    base = load_hf_model(model_path)
    model = get_peft_model(base, LoraConfig(r=config.rank, lora_alpha=config.alpha,
                                            target_modules=list(config.targets), lora_dropout=0.0, bias="none",
                                            task_type="CAUSAL_LM"))
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
            loss = _loss(model, *_batch(order[i:i + config.batch_size]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if held_set:
            held_losses.append((step, _mean_loss(model, held_set, config.batch_size)))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", held_out=f"{held_losses[-1][1]:.3f}")
    bar.close()

    adapter = _save_adapter(model, folder, config.adapter_dir, model_path)
    seconds = time.perf_counter() - started
    report = _write_report(folder, character.id, model_path, config, train_convs, held_convs, losses, held_losses,
                           seconds)
    _point_yaml_at(folder / CHARACTER_FILE, config.adapter_dir)
    return TrainResult(adapter, report, len(train_convs), len(held_convs), losses[-1] if losses else float("nan"),
                       held_losses[-1][1] if held_losses else None, seconds)


def _batch(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (padding has no loss)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return ids, mask, labels


def _loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the supervised tokens, as transformers computes it, but faster on CPU:
    matmuls run in bfloat16 (autocast; LoRA weights, gradients and the optimizer stay float32), and
    the 49152-wide output head runs only at the positions that have a label (~15% of them)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = model.base_model.model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


@torch.no_grad()
def _mean_loss(model, examples: list[Example], batch_size: int) -> float:
    """Token-weighted mean loss over the supervised tokens of `examples`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        n = sum(e.supervised for e in chunk)
        total += _loss(model, *_batch(chunk)).item() * n
        count += n
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
                  losses: list[float], held_losses: list[tuple[int, float]], seconds: float) -> Path:
    out = folder / REPORT_DIR
    out.mkdir(exist_ok=True)
    report = {
        "character": cid, "model": model_path.name, "config": {**asdict(config), "targets": list(config.targets)},
        "train_lines": [c.line for c in train_convs], "held_out_lines": [c.line for c in held_convs],
        "train_loss": losses, "held_out_loss": [{"step": s, "loss": v} for s, v in held_losses],
        "seconds": round(seconds, 1), "torch": torch.__version__,
    }
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=1))
    _plot(out / "loss.png", cid, losses, held_losses)
    return path


def _plot(path: Path, cid: str, losses: list[float], held: list[tuple[int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, label="train (per step)", linewidth=1)
    if held:
        ax.plot([s for s, _ in held], [v for _, v in held], "o-", label="held out (per epoch)")
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
