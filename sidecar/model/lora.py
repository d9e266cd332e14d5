"""LoRA adapters: PEFT folders -> stacked slots -> per-row deltas inside the batched forward.

An adapter adds, to each target module m of each layer, delta_m(x) = (x @ A_m.T) @ B_m.T * scale_m
with A_m [r, in], B_m [out, r] and scale_m = alpha / r (alpha / sqrt(r) with rsLoRA).

Storage. The model fuses q/k/v into one projection "qkv" and gate/up into "gate_up"; their LoRA
parts are stored together so that one matmul computes the shrink of every part of every slot:
  A[layer][proj]: [parts * slots * rank, in], rows ordered (part, slot, r)
  B[layer][proj][part]: [slots * rank, out_part], rows ordered (slot, r), scale folded in
`rank` is the largest rank resident (it grows on demand up to max_rank); smaller ranks are
zero-padded. Slot -1 means "base model" for a row.

The one-adapter path (a prefill segment, or a decode batch whose rows all use one adapter) reads
the adapter's own tensors (in the engine's dtype), with no copy per slot: `LoraAdapter` keeps each
fused projection's A parts stacked, A_s [sum of ranks, in], so one shrink matmul serves all parts,
then one expand per part, in float32 (widened per call): small fp32 GEMMs run 3-4x faster than
bf16 ones of the same shape on the CPUs met (docs/benchmarks.md). The stacks above are what CUDA's
kernel and the masked op read (allocated at the first adapter's load on a CPU); on a CPU in bf16 the
native kernel reads each adapter where it lies instead, and a slot is only pointers (`LoraSlots`).

On CUDA the stacks live on the GPU and decode batches use the Triton BGMV kernel
(model/cuda/lora_triton.py), which reads only each row's own adapter and never syncs with the
host, so it runs inside captured CUDA graphs; without Triton they take the masked torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import deserialize

from sidecar.errors import AdapterError
from sidecar.model.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_CONFIG_BYTES, adapter_digest
from sidecar.model.config import LlamaConfig
from sidecar.model.cuda import triton_available
from sidecar.model.native import BgmvKernel, bgmv_kernel

# PEFT module name -> (fused projection, part index). The part order matches the fused weights.
MODULES = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
           "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}
PROJECTIONS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
               "down": ("down_proj",)}
# One adapter's share of a fused projection on the one-adapter path: A_s [sum r, in] and, per targeted
# part, (first output column, end column, first row of A_s, end row, B [out_part, r]).
OneAdapter = tuple[torch.Tensor, tuple[tuple[int, int, int, int, torch.Tensor], ...]]
_TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.([0-9]+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")  # under `self_attn`; the others under `mlp`

# safetensors dtypes a LoRA weight may have
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# rank_pattern / alpha_pattern keys are module names or dotted paths. PEFT reads them as regular
# expressions; an adapter file is not trusted to supply one (`(.*)*X` takes minutes per module).
_PLAIN_PATTERN_KEY = re.compile(r"[\w.-]{1,200}")


class WeightsError(AdapterError):
    """A problem with a tensor of adapter_model.safetensors: the message names the file too."""

    def __init__(self, folder: object, problem: str):
        super().__init__(folder, f"adapter_model.safetensors: {problem}")


def module_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each LoRA target module of the base model."""
    c = config
    return {"q_proj": (c.q_size, c.hidden_size), "k_proj": (c.kv_size, c.hidden_size),
            "v_proj": (c.kv_size, c.hidden_size), "o_proj": (c.hidden_size, c.q_size),
            "gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
            "down_proj": (c.hidden_size, c.intermediate_size)}


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter in memory: per (layer, module), A [r, in] and B [out, r] with the scale folded into B."""

    name: str
    path: Path
    fingerprint: str  # digest of the bytes the weights came from (+ scale): the identity the prefix cache keys on
    rank: int
    # each A a view into `stacked`; each B [out, r] a view of its transpose, held contiguous (the native kernel's)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    # (layer, fused projection) -> its targeted parts' A stacked in PROJECTIONS order [sum r, in]
    stacked: dict[tuple[int, str], torch.Tensor] = dataclass_field(init=False, repr=False, compare=False)

    def __post_init__(self):
        stacked = {}
        for layer in sorted({layer for layer, _ in self.weights}):
            for projection, modules in PROJECTIONS.items():
                pairs = [(m, self.weights[(layer, m)]) for m in modules if (layer, m) in self.weights]
                if not pairs:
                    continue
                a_all = torch.cat([a for _, (a, _) in pairs]).contiguous()
                stacked[(layer, projection)] = a_all
                row = 0
                for module, (a, b) in pairs:  # views: the adapter is held once; B as its transpose [r, out]
                    self.weights[(layer, module)] = (a_all[row:row + a.shape[0]], b.t().contiguous().t())
                    row += a.shape[0]
        object.__setattr__(self, "stacked", stacked)

    def cast(self, dtype: torch.dtype) -> LoraAdapter:
        return LoraAdapter(self.name, self.path, self.fingerprint, self.rank,
                           {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in self.weights.items()})

    @property
    def target_modules(self) -> set[str]:
        return {m for _, m in self.weights}


def _fingerprint(config_sha256: bytes, weights_sha256: bytes, scale: float) -> str:
    """Names the very bytes the weights were parsed from (hashed from that one read, never re-read: a file
    replaced meanwhile must not lend its name to K/V of the old weights), the way the registry's adapter
    version names them, plus the scale, which changes the K/V too."""
    digest = adapter_digest({ADAPTER_CONFIG: config_sha256, ADAPTER_WEIGHTS: weights_sha256})
    return digest.hex()[:16] + ("" if scale == 1.0 else f"x{scale!r}")


def pattern_value(patterns: dict, module_path: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: keys match the end of the module's dotted path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def load_peft_adapter(folder: Path, config: LlamaConfig, max_rank: int = 64, name: str | None = None,
                      scale: float = 1.0, dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Reads and validates a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).

    `scale` multiplies every delta on top of alpha / r (a character's `lora_scale`: how strongly
    the persona adapter speaks); it is part of the fingerprint, since the K/V it gives differ.
    `dtype` is what the weights are held in once checked (the torch engine: its model's, so that a
    bf16 engine holds each adapter in the bf16 its decode kernel reads).
    Pickled weights are never opened. Every problem is an AdapterError naming the file and the
    field or tensor, whatever the files hold.
    """
    folder = Path(folder)
    if not math.isfinite(scale) or scale < 0:
        raise AdapterError(folder, f"scale must be a finite number >= 0, got {scale}")
    if not folder.is_dir():
        raise AdapterError(folder, "no such folder")
    cfg_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pkl")):
            raise AdapterError(folder, "pickled weights (adapter_model.bin) are refused: loading them can run "
                                       "arbitrary code; save the adapter as adapter_model.safetensors")
        raise AdapterError(folder, "missing adapter_model.safetensors")
    if not cfg_path.is_file():
        raise AdapterError(folder, "missing adapter_config.json")
    settings, config_sha256 = _read_settings(folder, cfg_path, max_rank)
    raw, weights_sha256 = _read_tensors(folder, weights_path, config, max_rank)

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    top_rank = 0
    for (layer, module), pair in sorted(raw.items()):
        where = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise WeightsError(folder, f"{where}: lora_A and lora_B must both be present")
        a, b = pair["A"].float(), pair["B"].float()
        rank = a.shape[0]
        if b.shape[1] != rank:
            out, inp = module_shapes(config)[module]
            raise WeightsError(folder, f"{where}: shapes A {list(a.shape)} / B {list(b.shape)} do not match the "
                                       f"base model (expected A [r, {inp}], B [{out}, r])")
        path = f"model.layers.{layer}.{'self_attn' if module in _ATTENTION else 'mlp'}.{module}"
        declared = pattern_value(settings.rank_pattern, path, settings.rank)
        if rank != declared:  # PEFT scales by the declared rank: a mismatch would silently mis-scale
            raise WeightsError(folder, f"{where}: the tensors have rank {rank}, adapter_config.json says {declared}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise WeightsError(folder, f"{where}: weights contain NaN or inf")
        alpha = pattern_value(settings.alpha_pattern, path, settings.alpha)
        b = b * ((alpha / math.sqrt(rank) if settings.rslora else alpha / rank) * scale)
        if not torch.isfinite(b).all():
            raise WeightsError(folder, f"{where}: lora_alpha {alpha:g} scales the weights past the float range")
        weights[(layer, module)] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
        top_rank = max(top_rank, rank)
    return LoraAdapter(name or folder.name, folder, _fingerprint(config_sha256, weights_sha256, scale), top_rank,
                       weights)


@dataclass(frozen=True)
class _Settings:
    """What adapter_config.json says about scaling; every value checked."""

    rank: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


def _read_capped(folder: Path, path: Path, limit: int, over: str) -> bytes:
    """The whole file from one read: refused by its size before reading (`over` says why), and if it grew
    past `limit` while being read."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise AdapterError(folder, f"{path.name} is {size} bytes{over}")
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise AdapterError(folder, f"cannot read {path.name} ({e.strerror or e})") from None
    if len(data) > limit:
        raise AdapterError(folder, f"{path.name} grew past {limit} bytes while being read{over}")
    return data


def _read_settings(folder: Path, cfg_path: Path, max_rank: int) -> tuple[_Settings, bytes]:
    """The checked settings and the sha256 of the bytes they were parsed from."""
    def fail(field: str, problem: str):
        raise AdapterError(folder, f"adapter_config.json: {field}: {problem}")

    data = _read_capped(folder, cfg_path, MAX_CONFIG_BYTES, f"; the limit is {MAX_CONFIG_BYTES}")
    try:
        cfg = json.loads(data)
    except (ValueError, RecursionError) as e:  # (bad UTF-8 and 5000-digit numbers are ValueErrors too)
        raise AdapterError(folder, f"adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(folder, "adapter_config.json must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(folder, f"peft_type {_show(cfg.get('peft_type'))} is not supported (only LORA)")
    for flag, problem in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")):
        if cfg.get(flag):
            raise AdapterError(folder, f"{problem} adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(folder, f"bias={_show(cfg.get('bias'))} is not supported (only 'none')")

    rank = cfg.get("r")
    if not _is_rank(rank):
        fail("r", f"must be a whole number of at least 1, got {_show(rank)}")
    if rank > max_rank:
        fail("r", f"rank {rank} is above max_rank {max_rank}")
    alpha = cfg.get("lora_alpha", rank)
    if not _is_number(alpha):
        fail("lora_alpha", f"must be a finite number, got {_show(alpha)}")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        fail("use_rslora", f"must be true or false, got {_show(rslora)}")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):  # (a string is PEFT's regex or "all-linear": the tensors decide)
        for target in targets:
            if not isinstance(target, str) or target.rsplit(".", 1)[-1] not in MODULES:
                fail("target_modules", f"{_show(target)} is not a module we support ({', '.join(MODULES)})")
    elif targets is not None and not isinstance(targets, str):
        fail("target_modules", f"must be a list of module names, got {_show(targets)}")

    patterns = {}
    for field, valid, what in (("rank_pattern", _is_rank, "a whole number of at least 1"),
                               ("alpha_pattern", _is_number, "a finite number")):
        table = cfg.get(field) or {}
        if not isinstance(table, dict):
            fail(field, f"must be an object of module name -> value, got {_show(table)}")
        for key, value in table.items():
            if not _PLAIN_PATTERN_KEY.fullmatch(key):
                fail(field, f"key {_show(key)} must be a module name or dotted path (letters, digits, _ - .), "
                            "not a regular expression")
            if not valid(value):
                fail(f"{field}.{key}", f"must be {what}, got {_show(value)}")
            if field == "rank_pattern" and value > max_rank:
                fail(f"{field}.{key}", f"rank {value} is above max_rank {max_rank}")
        patterns[field] = table
    settings = _Settings(rank, float(alpha), rslora, patterns["rank_pattern"], patterns["alpha_pattern"])
    return settings, hashlib.sha256(data).digest()


def _read_tensors(folder: Path, weights_path: Path, config: LlamaConfig,
                  max_rank: int) -> tuple[dict[tuple[int, str], dict[str, torch.Tensor]], bytes]:
    """{(layer, module): {"A": tensor, "B": tensor}} and the sha256 of the bytes they came from.

    The file is read once into memory: the hash and the tensors describe the same bytes, and the
    tensors are copies (a memory map would change under a file rewritten in place, or fault if it
    shrank). Each tensor's name, dtype and shape are checked before it becomes a tensor.
    """
    shapes = module_shapes(config)
    # The largest file a valid adapter can be: every module at max_rank in float64, plus a header.
    limit = 8 * max_rank * config.num_layers * sum(out + inp for out, inp in shapes.values()) + (1 << 20)
    data = _read_capped(folder, weights_path, limit, f", more than a rank-{max_rank} adapter of this model can be "
                                                     f"({limit})")
    sha256 = hashlib.sha256(data).digest()
    try:
        views = sorted(deserialize(data), key=lambda view: view[0])  # by name, as safe_open lists them
    except Exception as e:  # safetensors raises its own types on damaged files
        raise AdapterError(folder, f"cannot read adapter_model.safetensors ({e})") from None
    del data
    raw: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, view in views:
        m = _TENSOR_NAME.match(key)
        if m is None:
            raise WeightsError(folder, f"tensor {key!r} is not a LoRA A/B weight of a supported module "
                                       f"({', '.join(MODULES)})")
        layer, parent, module, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in MODULES:
            raise WeightsError(folder, f"target module {module!r} is not in the model "
                                       f"(supported: {', '.join(MODULES)})")
        if parent != ("self_attn" if module in _ATTENTION else "mlp"):
            raise WeightsError(folder, f"tensor {key!r}: {module} is not under {parent} in this model")
        if layer >= config.num_layers:
            raise WeightsError(folder, f"tensor {key!r} is for layer {layer}, the model has "
                                       f"{config.num_layers} layers")
        where = f"layer {layer} {module}"
        dtype, shape = view["dtype"], list(view["shape"])
        if dtype not in _FLOAT_DTYPES:
            raise WeightsError(folder, f"tensor {key!r} holds {dtype} values; LoRA weights are floats "
                                       f"({', '.join(_FLOAT_DTYPES)})")
        out, inp = shapes[module]
        rank = (shape[0] if which == "A" else shape[1]) if len(shape) == 2 else -1
        if shape != ([rank, inp] if which == "A" else [out, rank]):
            raise WeightsError(folder, f"{where}: lora_{which} has shape {shape}: the shapes do not match "
                                       f"the base model (expected A [r, {inp}], B [{out}, r])")
        if rank > max_rank:
            raise WeightsError(folder, f"{where}: rank {rank} is above max_rank {max_rank}")
        if rank < 1:
            raise WeightsError(folder, f"{where}: rank must be at least 1")
        pair = raw.setdefault((layer, module), {})
        if which in pair:
            raise WeightsError(folder, f"{where}: two lora_{which} tensors (one is {key!r})")
        # (safetensors checked that the data is exactly shape x dtype; its bytearray is this tensor's own)
        pair[which] = torch.frombuffer(view["data"], dtype=_FLOAT_DTYPES[dtype]).reshape(shape)
    if not raw:
        raise AdapterError(folder, "adapter_model.safetensors holds no LoRA weights")
    return raw, sha256


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _SlotPointers:
    """Where each slot's adapter lies, for one (layer, projection): what the native kernel reads in place of
    stacks. a[s]: the slot's stacked A rows; first / rank / b per (slot, part): the part's first row in it,
    its rank (0: not targeted) and its B transposed [r, out]."""

    def __init__(self, slots: int, parts: int):
        self.parts = parts
        self.a = (ctypes.c_void_p * slots)()
        self.first = (ctypes.c_int64 * (slots * parts))()
        self.rank = (ctypes.c_int64 * (slots * parts))()
        self.b = (ctypes.c_void_p * (slots * parts))()

    def point(self, slot: int, a: torch.Tensor | None, parts: list[tuple[int, int, torch.Tensor] | None]) -> None:
        self.a[slot] = None if a is None else a.data_ptr()
        for j, part in enumerate(parts):
            first, rank, b_t = part if part is not None else (0, 0, None)
            i = slot * self.parts + j
            self.first[i], self.rank[i], self.b[i] = first, rank, None if b_t is None else b_t.data_ptr()


class LoraSlots:
    """Resident adapters (layout in the module docstring). On a CPU in bfloat16 with the native kernel built,
    a slot points at its adapter's own tensors (`stacked` False: the kernel reads them where they lie, so an
    adapter is held once); elsewhere (CUDA's Triton kernel, float32, no C compiler) the slots are stacks."""

    def __init__(self, config: LlamaConfig, num_slots: int, dtype: torch.dtype, rank: int = 8,
                 device: str | torch.device = "cpu", stacked: bool | None = None):
        self.config, self.num_slots, self.dtype = config, num_slots, dtype
        self.device = torch.device(device)
        self.generation = 0  # bumped when the stacks are reallocated (captured CUDA graphs hold their addresses)
        shapes = module_shapes(config)
        self.part_out = {p: tuple(shapes[m][0] for m in mods) for p, mods in PROJECTIONS.items()}
        self.in_features = {p: shapes[mods[0]][1] for p, mods in PROJECTIONS.items()}
        self.part_out_c = {p: (ctypes.c_int64 * len(outs))(*outs) for p, outs in self.part_out.items()}
        self.stacked = stacked if stacked is not None else not (
            self.device.type == "cpu" and dtype == torch.bfloat16 and bgmv_kernel() is not None)
        self.rank = 0
        self.A: list[dict[str, torch.Tensor]] = []
        self.B: list[dict[str, list[torch.Tensor]]] = []
        # single[slot][layer][projection]: the slot's adapter's own A_s and parts (`_parts`), or None when
        # that projection is not targeted; the one-adapter path reads them (no copy on the CPU)
        self.single: list[list[dict[str, OneAdapter | None]] | None] = [None] * num_slots
        self.held: list[LoraAdapter | None] = [None] * num_slots  # what each slot points at (kept alive)
        self.pointers = [{p: _SlotPointers(num_slots, len(mods)) for p, mods in PROJECTIONS.items()}
                         for _ in range(config.num_layers)] if not self.stacked else []
        if self.stacked:
            self._resize(rank)

    def _resize(self, rank: int) -> None:
        """(Re)allocates the stacks for `rank`, keeping what is loaded (zero-padded)."""
        old_rank, old_A, old_B = self.rank, self.A, self.B
        S = self.num_slots
        on = {"dtype": self.dtype, "device": self.device}
        self.A = [{p: torch.zeros(len(self.part_out[p]) * S * rank, self.in_features[p], **on)
                   for p in PROJECTIONS} for _ in range(self.config.num_layers)]
        self.B = [{p: [torch.zeros(S * rank, out, **on) for out in self.part_out[p]]
                   for p in PROJECTIONS} for _ in range(self.config.num_layers)]
        self.rank = rank
        self.generation += 1
        if old_rank:
            keep = min(old_rank, rank)
            for layer in range(self.config.num_layers):
                for p in PROJECTIONS:
                    parts = len(self.part_out[p])
                    self.A[layer][p].view(parts, S, rank, -1)[:, :, :keep] = \
                        old_A[layer][p].view(parts, S, old_rank, -1)[:, :, :keep]
                    for j in range(parts):
                        self.B[layer][p][j].view(S, rank, -1)[:, :keep] = \
                            old_B[layer][p][j].view(S, old_rank, -1)[:, :keep]

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Puts an adapter in `slot`: points at it, or copies it into the stacks (untargeted modules: zeros)."""
        if not self.stacked:
            self._point(slot, adapter)
            return
        if adapter.rank > self.rank:
            self._resize(adapter.rank)
        S, r = self.num_slots, self.rank
        for layer in range(self.config.num_layers):
            for p, mods in PROJECTIONS.items():
                a_view = self.A[layer][p].view(len(mods), S, r, -1)
                for j, module in enumerate(mods):
                    b_view = self.B[layer][p][j].view(S, r, -1)
                    a_view[j, slot].zero_()
                    b_view[slot].zero_()
                    pair = adapter.weights.get((layer, module))
                    if pair is not None:
                        a, b = pair
                        a_view[j, slot, : a.shape[0]] = a.to(self.dtype)
                        b_view[slot, : a.shape[0]] = b.t().to(self.dtype)
        self.single[slot] = [{p: self._compact(adapter, layer, p) for p in PROJECTIONS}
                             for layer in range(self.config.num_layers)]

    def _point(self, slot: int, adapter: LoraAdapter) -> None:
        if any(t.dtype != self.dtype for pair in adapter.weights.values() for t in pair):
            adapter = adapter.cast(self.dtype)  # (an adapter read for another dtype: this slot's own copy)
        self.held[slot] = adapter
        for layer in range(self.config.num_layers):
            for p, mods in PROJECTIONS.items():
                parts, row = [], 0
                for module in mods:
                    pair = adapter.weights.get((layer, module))
                    if pair is None:
                        parts.append(None)
                        continue
                    a, b = pair
                    parts.append((row, a.shape[0], b.t()))  # b is a view of B transposed, contiguous
                    row += a.shape[0]
                self.pointers[layer][p].point(slot, adapter.stacked.get((layer, p)), parts)
        self.single[slot] = [{p: self._compact(adapter, layer, p) for p in PROJECTIONS}
                             for layer in range(self.config.num_layers)]

    def _compact(self, adapter: LoraAdapter, layer: int, projection: str) -> OneAdapter | None:
        """The adapter's stacked A of one projection and, per targeted part, (its output columns, its rows
        of A, B): tensors of the adapter itself on the CPU, copied only to another device."""
        a = adapter.stacked.get((layer, projection))
        if a is None:
            return None
        parts, col, row = [], 0, 0
        for module, out in zip(PROJECTIONS[projection], self.part_out[projection], strict=True):
            pair = adapter.weights.get((layer, module))
            if pair is not None:
                rank = pair[0].shape[0]
                parts.append((col, col + out, row, row + rank, pair[1].to(self.device)))
                row += rank
            col += out
        return a.to(self.device), tuple(parts)

    def clear(self, slot: int) -> None:
        self.single[slot] = None
        if not self.stacked:
            for layer in self.pointers:
                for p, pointers in layer.items():
                    pointers.point(slot, None, [None] * len(PROJECTIONS[p]))
            self.held[slot] = None
            return
        S, r = self.num_slots, self.rank
        for layer in range(self.config.num_layers):
            for p, mods in PROJECTIONS.items():
                self.A[layer][p].view(len(mods), S, r, -1)[:, slot].zero_()
                for j in range(len(mods)):
                    self.B[layer][p][j].view(S, r, -1)[slot].zero_()

    def nbytes(self) -> int:
        """The stacks' bytes (the one-adapter path reads the adapters' own tensors)."""
        return sum(t.numel() * t.element_size() for layer in self.A for t in layer.values()) + sum(
            t.numel() * t.element_size() for layer in self.B for parts in layer.values() for t in parts)


# --- batched LoRA ops ----------------------------------------------------------------------------


def lora_bgmv(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor], slot_mask: torch.Tensor,
              part_out: tuple[int, ...]) -> None:
    """Decode: every row with its own adapter, in one shrink and one expand per part (in place on y).

    Semantics, as a slow loop (x [N, in], y [N, sum(part_out)], slots [N] with -1 = base):
        for n in range(N):
            s = slots[n]
            if s < 0: continue
            for j, (lo, hi) in enumerate(part column ranges):
                y[n, lo:hi] += (x[n] @ A_j[s].T) @ B_j[s]     # A_j[s]: [r, in], B_j[s]: [r, out_j]
    Here A is [parts * S * r, in] (rows (part, slot, r)), Bs[j] is [S * r, out_j] and slot_mask is
    [N, S * r] with ones on the r columns of row n's slot (all zero for base rows). The shrink is
    computed for every resident slot at once and masked, so the op count does not grow with the
    number of distinct adapters in the batch.
    """
    n, parts = x.shape[0], len(part_out)
    t = F.linear(x, A).view(n, parts, -1) * slot_mask[:, None, :]  # [N, parts, S*r]
    lo = 0
    for j, out in enumerate(part_out):
        y[:, lo:lo + out].addmm_(t[:, j], Bs[j])
        lo += out


def lora_sgmv(y: torch.Tensor, x: torch.Tensor, compact: list[OneAdapter | None],
              segments: list[tuple[int, int, int]]) -> None:
    """Rows grouped into segments that share one adapter (in place on y).

    Semantics: for each (start, end, slot) in segments with slot >= 0, for each part j,
        y[start:end, lo_j:hi_j] += (x[start:end] @ A_j[slot].T) @ B_j[slot]
    `compact[slot]` is that slot's (A_s [sum r, in], parts) for this projection, each part (lo, hi, first
    row of A_s, end row, B [out_part, r]): one shrink for all parts, one expand per part added in place.
    In the activations' dtype: the matmuls accumulate in float32 and round once, the shrink's r columns and
    the sum; widening to float32 instead cost up to 8x at 170 rows (a [T, out] float32 temporary added into
    y's strided columns; docs/design-notes.md, "A second format for prompts").
    """
    for start, end, slot in segments:
        entry = compact[slot] if slot >= 0 else None
        if entry is None:
            continue
        a, parts = entry
        rows = x[start:end]
        t = F.linear(rows, a.to(rows.dtype))
        for lo, hi, r0, r1, b in parts:
            y[start:end, lo:hi].addmm_(t[:, r0:r1], b.to(rows.dtype).t())


class LoraBatch:
    """The LoRA hook of one forward call: which slot each batch row uses (model/llama.LoraHook).

    Decode (one token per row) goes to a kernel that reads exactly one adapter per row: the
    native BGMV kernel on the CPU when it is built and the model runs in bfloat16, the Triton one
    on CUDA. Otherwise a batch with one adapter (a prefill chunk, a single NPC) takes the segment
    path, and mixed decode batches the masked all-slot path, which keeps the op count fixed at the
    price of S-fold arithmetic.
    """

    def __init__(self, slots: LoraSlots, row_slots: list[int], tokens_per_row: int,
                 kernel: BgmvKernel | None | bool = True):
        self.slots = slots
        self.active = any(s >= 0 for s in row_slots)
        self.kernel = (bgmv_kernel() if kernel is True else kernel or None) \
            if tokens_per_row == 1 and not slots.stacked else None
        use_triton = tokens_per_row == 1 and slots.device.type == "cuda" and kernel is not False and triton_available()
        self.triton = _triton_bgmv() if use_triton else None
        self.row_slot = torch.tensor(row_slots, dtype=torch.int64, device=slots.device)
        self.segments: list[tuple[int, int, int]] | None = None
        self._row_slots, self._tokens_per_row = row_slots, tokens_per_row
        if self.triton is None and self.kernel is None:  # neither kernel: segments, or the masked all-slot op
            self._fall_back()

    def _fall_back(self) -> None:
        """Segments (rows grouped by adapter), or the masked all-slot op for mixed decode rows on stacks."""
        self.kernel = None
        if len(set(self._row_slots)) == 1 or self._tokens_per_row > 1 or not self.slots.stacked:
            self.segments = _segments([s for s in self._row_slots for _ in range(self._tokens_per_row)])
        else:
            self.mask = _slot_mask(self.slots, self.row_slot)

    @classmethod
    def for_graph(cls, slots: LoraSlots, row_slot: torch.Tensor) -> LoraBatch:
        """The decode hook a captured CUDA graph replays: `row_slot` is a device buffer the caller
        refills before each replay (-1 = no adapter), read by the Triton kernel on the GPU."""
        hook = cls.__new__(cls)
        hook.slots, hook.active, hook.kernel, hook.triton, hook.segments = slots, True, None, _triton_bgmv(), None
        hook.row_slot = row_slot
        return hook

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return y
        s = self.slots
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if self.triton is not None:
            self.triton(y2, x2, s.A[layer][module], s.B[layer][module], self.row_slot, s.num_slots, s.rank,
                             s.part_out[module])
            return y
        if self.kernel is not None:
            where = s.pointers[layer][module]
            if x2.dtype == torch.bfloat16 and self.kernel(y2, x2, self.row_slot, s.num_slots, where.a, where.first,
                                                          where.rank, where.b, s.part_out_c[module]):
                return y
            self._fall_back()  # the kernel declined (sizes beyond its limits): for the rest of this call too
        if self.segments is not None:
            compact = [None if c is None else c[layer][module] for c in s.single]
            lora_sgmv(y2, x2, compact, self.segments)
        else:
            lora_bgmv(y2, x2, s.A[layer][module], s.B[layer][module], self.mask, s.part_out[module])
        return y


def _slot_mask(slots: LoraSlots, row_slot: torch.Tensor) -> torch.Tensor:
    """[N, S*r]: ones on the rank columns of each row's slot (lora_bgmv's mask)."""
    owner = torch.arange(slots.num_slots, device=row_slot.device).repeat_interleave(slots.rank)
    return (owner[None, :] == row_slot[:, None]).to(slots.dtype)


def _triton_bgmv():
    """model/cuda/lora_triton.lora_bgmv_triton, imported where it is used (Triton is optional)."""
    from sidecar.model.cuda.lora_triton import lora_bgmv_triton

    return lora_bgmv_triton


def _segments(token_slots: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal slots: [(start, end, slot), ...]."""
    out, start = [], 0
    for i in range(1, len(token_slots) + 1):
        if i == len(token_slots) or token_slots[i] != token_slots[start]:
            out.append((start, i, token_slots[start]))
            start = i
    return out
