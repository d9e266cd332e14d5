"""Llama-family forward: prefill and batched decode over a static KV cache, with LoRA hooks.

Covers SmolLM2, Llama 2/3.x, Mistral-style and Qwen2 models: GQA, RoPE (rotate-half layout, optional
Llama-3 / linear scaling), RMSNorm, SwiGLU, tied embeddings, q/k/v biases (Qwen2). q/k/v are one fused matmul and
gate/up another, because on a 2-core CPU the number of ops per step, not FLOPs, sets the pace
at small batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sidecar.model.checkpoint import QUANT_KINDS, Checkpoint, SourceTensor
from sidecar.model.config import LlamaConfig
from sidecar.model.native import decode_attention_kernel, rms_norm_kernel
from sidecar.model.quant import (
    COMPUTE_DTYPE,
    INT4_SOURCES,
    QUANTIZED,
    BlockEmbedding,
    BlockLinear,
    DenseLinear,
    Linear,
    PromptDenseLinear,
    build_linear,
)

# Triton's decode attention reads each row's own length from a tensor, so one captured CUDA graph
# serves every step; it is imported on first CUDA use (Triton is absent on CPU-only installs).
_decode_attention = None


class LoraHook(Protocol):
    """Adds a per-row LoRA delta to a projection's output (implemented by model/lora.py).

    `module` is one of "qkv", "o", "gate_up", "down"; x is the projection input [B, T, in] and
    y its base output [B, T, out]. Returns y plus the delta of each row's adapter.
    """

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: Linear  # rows: q (num_heads * head_dim), k, v (num_kv_heads * head_dim each)
    o: Linear
    ffn_norm: torch.Tensor
    gate_up: Linear  # rows: gate (intermediate), up (intermediate)
    down: Linear
    qkv_bias: torch.Tensor | None = None  # [q + 2 kv] (Qwen2)


class KVCache:
    """K/V storage: `k_all` / `v_all` are [layers, rows, kv_heads, capacity, head_dim].

    Each sequence owns one row and writes the keys of position p at [:, row, :, p]; `k[layer]` is
    that layer's view. Keeping a batch in contiguous rows lets attention read the cache as a view,
    without a gather; moving or saving a row is one copy for all layers.

    On the CPU the positions held grow with use (`reserve`, doubling from GROWTH_START up to max_len):
    16 rows of a 2,048-token context would hold 0.8 GB of the embedded model's K/V from the start,
    where NPC lines use a few hundred positions. A CUDA cache is allocated whole, since captured
    graphs hold its addresses.
    """

    GROWTH_START = 256

    def __init__(self, config: LlamaConfig, rows: int, max_len: int, dtype: torch.dtype, device: str = "cpu",
                 grow: bool | None = None):
        if max_len > config.max_position:
            raise ValueError(f"KV length {max_len} exceeds the model's context of {config.max_position} tokens")
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.rows, self.max_len = rows, max_len
        grow = self.device.type == "cpu" if grow is None else grow
        self.capacity = 0
        self._allocate(min(max_len, self.GROWTH_START) if grow else max_len)

    def _allocate(self, capacity: int) -> None:
        c = self.config
        shape = (c.num_layers, self.rows, c.num_kv_heads, capacity, c.head_dim)
        # Plain tensors even when a forward (inference mode) grows the cache: the prefix cache and row
        # moves write into it outside inference mode, which torch refuses on inference tensors.
        with torch.inference_mode(False):
            k_all = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v_all = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.capacity:
                k_all[:, :, :, : self.capacity] = self.k_all
                v_all[:, :, :, : self.capacity] = self.v_all
        self.k_all, self.v_all, self.capacity = k_all, v_all, capacity
        self.k, self.v = list(self.k_all.unbind(0)), list(self.v_all.unbind(0))

    def reserve(self, length: int) -> None:
        """Makes positions [0, length) writable in every row (what is held is kept)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"position {length} is past this cache's {self.max_len} positions")
        grown = self.capacity
        while grown < length:
            grown *= 2
        self._allocate(min(grown, self.max_len))

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Positions [0, length) of row src -> row dst, every layer."""
        self.k_all[:, dst, :, :length] = self.k_all[:, src, :, :length]
        self.v_all[:, dst, :, :length] = self.v_all[:, src, :, :length]

    def nbytes(self) -> int:
        return 2 * self.k_all.numel() * self.k_all.element_size()


@dataclass(frozen=True)
class _StepLayout:
    """Everything about one forward call that is the same in every layer."""

    write_rows: torch.Tensor  # [B, T] cache row of each new token (or [B, 1] broadcast over T)
    write_pos: torch.Tensor  # [B, T] position of each new token
    read_rows: slice | torch.Tensor  # cache rows of the batch, as a view when contiguous
    kv_len: int
    mask: torch.Tensor | None  # additive [B, 1, T, kv_len]: 0 = may attend, -inf = not; None when not needed
    causal: bool  # plain causal prefill from position 0 (SDPA's own mask)
    cos: torch.Tensor  # [B, T, 1, head_dim]
    sin: torch.Tensor
    seq_lens: torch.Tensor | None = None  # [B] keys per row, for a decode kernel (CUDA's: rows 0..B-1)
    rows: torch.Tensor | None = None  # [B] cache row of each query, for the CPU decode kernel (native/attention.c)


class LlamaModel:
    def __init__(self, config: LlamaConfig, layers: list[LayerWeights], embed: torch.Tensor | BlockEmbedding,
                 norm: torch.Tensor, head: Linear, weights: str, dtype: torch.dtype, device: str = "cpu",
                 became: dict[tuple[str, str], int] | None = None):
        self.config = config
        self.device = torch.device(device)
        self.layers = layers
        self.embed = embed  # [vocab, hidden] in the compute dtype, or its stored blocks
        self.norm = norm
        self.head = head
        self.weights = weights  # the weight format: int4 | int8 | bf16 | fp32, or e.g. "int4+int8" from auto
        self.became = became or {}  # (stored kind, format) -> matrices, for the startup log
        self.dtype = dtype  # activation dtype
        # Decode steps on a CPU in bf16 (what is served): each row's own keys, native/attention.c
        kernel = decode_attention_kernel() if self.device.type == "cpu" and dtype == torch.bfloat16 else None
        fits = kernel is not None and kernel.takes(config.num_heads, config.num_kv_heads, config.head_dim)
        self._cpu_attention = kernel if fits else None
        self._cpu_norm = rms_norm_kernel() if self.device.type == "cpu" and dtype == torch.bfloat16 else None
        positions = torch.arange(config.max_position, dtype=torch.float32)
        angles = torch.outer(positions, config.inv_freq())  # [max_pos, head_dim / 2]
        angles = torch.cat([angles, angles], dim=-1)
        # Tables in fp32 then cast, as the HF reference does.
        self._cos = angles.cos().to(device=device, dtype=dtype)
        self._sin = angles.sin().to(device=device, dtype=dtype)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, weights: str, dtype: torch.dtype | None = None,
                        progress: bool = False, device: str = "cpu") -> LlamaModel:
        """Build the model in weight format `weights` (int4 | int8 | bf16 | fp32) on `device`
        (cpu, cuda[:N]; "meta" builds shapes only, for device-placement tests)."""
        c = ckpt.config
        dtype = dtype or COMPUTE_DTYPE[weights]
        on_cpu = torch.device(device).type == "cpu"
        became: Counter[tuple[str, str]] = Counter()  # (stored kind, format) -> matrices

        def linear(parts: list[SourceTensor]) -> Linear:
            built = build_linear(parts, weights, dtype, device)
            formats = getattr(built, "part_formats", [built.format] * len(parts))  # a StackedLinear's differ
            became.update((p.kind, f) for p, f in zip(parts, formats, strict=True))
            return built

        layers = []
        for i in tqdm(range(c.num_layers), desc=f"loading {weights} weights", unit="layer", disable=not progress):
            def t(name: str, i: int = i):
                return ckpt.tensor(f"layers.{i}.{name}")

            layers.append(LayerWeights(
                attn_norm=t("attn_norm").to_float().to(device=device, dtype=dtype),
                qkv=linear([t("q"), t("k"), t("v")]),
                o=linear([t("o")]),
                ffn_norm=t("ffn_norm").to_float().to(device=device, dtype=dtype),
                gate_up=linear([t("gate"), t("up")]),
                down=linear([t("down")]),
                qkv_bias=torch.cat([t(b).to_float() for b in ("q_bias", "k_bias", "v_bias")]).to(
                    device=device, dtype=dtype) if c.qkv_bias else None,
            ))
        embed_source = ckpt.tensor("embed")
        head_source = ckpt.tensor("embed" if c.tie_embeddings else "head")
        # The output head stays at 8 bits under int4 on the CPU, as llama.cpp keeps it: 4-bit
        # logits cost quality. A GPU has no int8 kernel; the head stays in the activation dtype.
        head_format = weights if weights not in ("int4", "auto") else "int8" if on_cpu else "bf16"
        if weights == "auto" and on_cpu and head_source.kind not in INT4_SOURCES:
            head_format = "auto"  # 5 bits or more: int8, or Q6_K blocks as stored (quant.build_linear)
        # Quantized on a CPU, the embedding stays in its stored blocks (shared with a tied head kept as stored):
        # only the rows a step reads are dequantized. Float sources and GPUs keep a dense table.
        blocks_embed = on_cpu and weights in ("int4", "int8", "auto") and embed_source.kind in QUANT_KINDS
        embed = None if blocks_embed else embed_source.to_float().to(device=device, dtype=dtype)
        if head_format in ("fp32", "bf16") and c.tie_embeddings and embed is not None:
            head = DenseLinear(embed, device)  # tied: share the embedding table
        else:
            head = build_linear([head_source], head_format, dtype, device)
        if embed is None:
            shared = head.blocks if c.tie_embeddings and isinstance(head, BlockLinear) else None
            embed = BlockEmbedding(embed_source, dtype, shared)
        layer_formats = "+".join(sorted({f for _, f in became}))  # "int4+int8" from auto on a Q4_K_M file
        became[(f"{head_source.kind} (output head)", head.format)] += 1
        norm = ckpt.tensor("norm").to_float().to(device=device, dtype=dtype)
        return cls(c, layers, embed, norm, head, layer_formats if weights == "auto" else weights, dtype, device,
                   dict(became))

    def prompt_copy_bytes(self, held: bool = False) -> int:
        """What bf16 copies of the layers' int4 / int8 matrices would take (0 when there are none), or with
        `held` what the copies already held take."""
        kinds = PromptDenseLinear if held else QUANTIZED
        return sum(2 * m.out_features * m.in_features for m in self.layer_matrices() if isinstance(m, kinds))

    def hold_prompt_copies(self) -> None:
        """Prompt chunks (several positions per row) of the int4 / int8 layer matrices run from a bf16 copy
        (quant.PromptDenseLinear); decode steps keep the quantized kernels."""
        for layer in self.layers:
            for name in ("qkv", "o", "gate_up", "down"):
                matrix = getattr(layer, name)
                if isinstance(matrix, QUANTIZED):
                    setattr(layer, name, PromptDenseLinear(matrix))

    def layer_matrices(self) -> list[Linear]:
        return [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        return KVCache(self.config, rows, max_len, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: list[int], rows: list[int], cache: KVCache,
                all_logits: bool = False, lora: LoraHook | None = None) -> torch.Tensor:
        """Run `tokens` [B, T] through the model and return float32 logits.

        Row b's tokens sit at positions start[b] .. start[b] + T - 1 of the sequence held in cache
        row rows[b]; their keys and values are written there. Logits are [B, V] for the last
        position of each row, or [B, T, V] with `all_logits`.
        """
        layout = self._layout(start, rows, tokens.shape[1])
        cache.reserve(layout.kv_len)
        return self._run(tokens.to(self.device), layout, cache, all_logits, lora)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               lora: LoraHook | None = None) -> torch.Tensor:
        """One new token per row for rows 0..B-1 of the cache, everything given as device tensors:
        tokens [B, 1] and positions [B] (where each row's token goes; it attends to 0..position).

        Nothing here reads a tensor's value on the host, so a CUDA graph can capture this call and
        replay it with new tokens, positions and adapter slots. Needs the Triton decode kernel.
        """
        global _decode_attention
        if _decode_attention is None:
            from sidecar.model.cuda.decode_attention import decode_attention as _decode_attention
        batch = tokens.shape[0]
        write_pos = positions[:, None]
        layout = _StepLayout(
            write_rows=torch.arange(batch, device=self.device)[:, None], write_pos=write_pos,
            read_rows=slice(0, batch), kv_len=cache.max_len, mask=None, causal=False,
            cos=self._cos[write_pos].unsqueeze(2), sin=self._sin[write_pos].unsqueeze(2), seq_lens=positions + 1)
        return self._run(tokens, layout, cache, False, lora)

    def _run(self, tokens: torch.Tensor, layout: _StepLayout, cache: KVCache, all_logits: bool,
             lora: LoraHook | None) -> torch.Tensor:
        # [B, T, hidden]; a BlockEmbedding dequantizes the rows it reads
        h = F.embedding(tokens, self.embed) if isinstance(self.embed, torch.Tensor) else self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h = h + self._attention(i, layer, self._rms_norm(h, layer.attn_norm), layout, cache, lora)
            h = h + self._mlp(i, layer, self._rms_norm(h, layer.ffn_norm), lora)
        if not all_logits:
            h = h[:, -1]
        return self.head(self._rms_norm(h, self.norm)).float()

    def _layout(self, start: list[int], rows: list[int], steps: int) -> _StepLayout:
        batch, device = len(start), self.device
        start_t = torch.tensor(start, device=device)
        write_pos = start_t[:, None] + torch.arange(steps, device=device)  # [B, T]
        kv_len = max(start) + steps
        if kv_len > self.config.max_position:
            raise ValueError(f"position {kv_len} is past the model's context of {self.config.max_position}")
        contiguous = rows == list(range(rows[0], rows[0] + batch))
        read_rows = slice(rows[0], rows[0] + batch) if contiguous else torch.tensor(rows, device=device)
        causal = batch == 1 and start[0] == 0 and steps > 1
        uniform_decode = steps == 1 and len(set(start)) == 1
        native = steps == 1 and self._cpu_attention is not None  # each row reads its own keys: no mask
        mask = None
        if not causal and not uniform_decode and not native:
            # Additive (0 / -inf) rather than boolean: SDPA's CPU kernel is ~2.5x slower with a
            # boolean mask (540 vs 210 us for 8 rows x 250 keys).
            allowed = torch.arange(kv_len, device=device)[None, None, None, :] <= write_pos[:, None, :, None]
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=device).masked_fill_(~allowed, float("-inf"))
        rows_t = torch.tensor(rows, device=device)
        return _StepLayout(
            write_rows=rows_t[:, None].expand(batch, steps),
            write_pos=write_pos,
            read_rows=read_rows,
            kv_len=kv_len,
            mask=mask,
            causal=causal,
            cos=self._cos[write_pos].unsqueeze(2),
            sin=self._sin[write_pos].unsqueeze(2),
            seq_lens=start_t + 1 if native else None,
            rows=rows_t if native else None,
        )

    def _rms_norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        c = self.config
        if self._cpu_norm is not None:  # one native pass instead of torch's ~7 small ops (native/rms_norm.c)
            return self._cpu_norm(h, weight, c.rms_eps)
        return F.rms_norm(h, (c.hidden_size,), weight, c.rms_eps)

    def _attention(self, i: int, layer: LayerWeights, x: torch.Tensor, layout: _StepLayout, cache: KVCache,
                   lora: LoraHook | None) -> torch.Tensor:
        c = self.config
        batch, steps, _ = x.shape
        heads, kv_heads, head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        qkv = layer.qkv(x)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        if lora is not None:
            qkv = lora.apply(i, "qkv", x, qkv)
        qkv = qkv.view(batch, steps, heads + 2 * kv_heads, head_dim)
        qk = _rope(qkv[:, :, : heads + kv_heads], layout.cos, layout.sin)  # q and k rotated together
        cache.k[i][layout.write_rows, :, layout.write_pos] = qk[:, :, heads:]
        cache.v[i][layout.write_rows, :, layout.write_pos] = qkv[:, :, heads + kv_heads:]
        out = None
        if layout.rows is not None:  # a CPU decode step: each row reads its own keys, wherever the row is
            out = self._cpu_attention(qk[:, 0, :heads], cache.k[i], cache.v[i], layout.rows, layout.seq_lens,
                                      head_dim ** -0.5)
        elif layout.seq_lens is not None:  # graph-friendly CUDA decode: each row reads its own length
            out = _decode_attention(qk[:, 0, :heads], cache.k[i], cache.v[i], layout.seq_lens, head_dim ** -0.5)
        if out is not None:
            out = out.reshape(batch, 1, heads * head_dim)
            y = layer.o(out)
            return y if lora is None else lora.apply(i, "o", out, y)
        k = cache.k[i][layout.read_rows][:, :, : layout.kv_len]  # [B, KVH, S, D]
        v = cache.v[i][layout.read_rows][:, :, : layout.kv_len]
        q = qk[:, :, :heads].transpose(1, 2)  # [B, H, T, D]
        if steps == 1:
            # Decode: the query heads sharing a KV head become "positions" of that head, so SDPA
            # runs without GQA expansion (several times faster on CPU).
            group = heads // kv_heads
            out = F.scaled_dot_product_attention(q.reshape(batch, kv_heads, group, head_dim), k, v,
                                                 attn_mask=layout.mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, is_causal=layout.causal,
                                                 enable_gqa=heads != kv_heads)
        out = out.reshape(batch, heads, steps, head_dim).transpose(1, 2).reshape(batch, steps, heads * head_dim)
        y = layer.o(out)
        return y if lora is None else lora.apply(i, "o", out, y)

    def _mlp(self, i: int, layer: LayerWeights, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        gate_up = layer.gate_up(x)
        if lora is not None:
            gate_up = lora.apply(i, "gate_up", x, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        y = layer.down(hidden)
        return y if lora is None else lora.apply(i, "down", hidden, y)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Hugging Face layout): x * cos + rotate_half(x) * sin. x: [B, T, heads, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
