"""Tolerances derived from the floating-point formats, so that they hold on any CPU (AMD EPYC, Intel Xeon
with AVX-512 / AMX kernels, ...), not numbers measured on one machine.

u is the unit roundoff: round to nearest moves a value by at most u of itself (fp32: 24 significant bits,
bf16: 8).
"""

from __future__ import annotations

import torch

U_FP32 = 2.0**-24
U_BF16 = 2.0**-8


def reordered_fp32(num_layers: int, logits: torch.Tensor) -> float:
    """How far two fp32 computations of the same logits may drift apart when only the order of the sums
    differs (another GEMM blocking for another batch shape or kernel, another library).

    Each of the 4 matmuls per layer (qkv, o, gate/up, down) may round its result differently, by about u of its
    scale; added up along the residual stream and carried to the logits, that is num_layers * 4 * u of the
    largest logit for each computation, twice that between two.
    """
    return 8 * num_layers * U_FP32 * logits.abs().max().item()
