"""Hyper-parameters of a Llama-family model (Llama, Mistral, SmolLM2, Qwen2), read from GGUF metadata or a
Hugging Face config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch



@dataclass(frozen=True)
class RopeScaling:
    """Context-extension applied to RoPE frequencies.

    kind "linear": positions are divided by `factor`.
    kind "llama3": Llama 3.1's frequency-dependent scaling (low/high frequency factors).
    kind "freq_factors": per-frequency divisors stored in the file (GGUF `rope_freqs.weight`).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    freq_factors: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3", "freq_factors"):
            raise ValueError(f"unsupported rope scaling {self.kind!r}")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    architecture: str = "llama"  # as the file names it (general.architecture / model_type), for reports

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim/2], float32, after any scaling."""
        import torch  # here, so that reading a model's shape (the remote backend) needs no torch

        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.rope_theta**exponents)
        s = self.rope_scaling
        if s is None:
            return inv_freq
        if s.kind == "linear":
            return inv_freq / s.factor
        if s.kind == "freq_factors":
            return inv_freq / torch.tensor(s.freq_factors, dtype=torch.float32)
        # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
        low_wavelen = s.original_max_position / s.low_freq_factor
        high_wavelen = s.original_max_position / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, blended, scaled)
