"""Pure-torch reference of row-wise symmetric int8 / int4 quantisation.

For a row x of a (R, C) tensor: scale = max|x| / qmax (qmax = 127 for int8, 7 for int4),
q = round(x / scale) clamped to [-qmax, qmax], stored as int8 (int4 values in int8; the
wire format packs them). Rounding is floor(y + 1/2), or floor(y + u) with u ~ U[0, 1)
for stochastic rounding, which is unbiased: E[q] * scale = x. An all-zero row has
scale 0 and q 0.
"""

from __future__ import annotations

import torch

QMAX = {8: 127, 4: 7}


def row_scales(x: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) -> (R,) float32 scales."""
    return x.float().abs().amax(dim=1) / QMAX[bits] if x.size(1) else x.new_zeros(x.size(0), dtype=torch.float32)


def quantize_rows_naive(x: torch.Tensor, bits: int = 8, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, C) float -> (q (R, C) int8, scales (R,) float32). noise: optional (R, C) uniform
    [0, 1) draws for stochastic rounding (None: round to nearest)."""
    qmax = QMAX[bits]
    scales = row_scales(x, bits)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    y = x.float() / safe[:, None]
    y = torch.floor(y + (0.5 if noise is None else noise.float()))
    q = y.clamp_(-qmax, qmax).to(torch.int8)
    return q, scales


def dequantize_rows_naive(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q (R, C) int8, scales (R,)) -> (R, C) in dtype."""
    return (q.float() * scales.float()[:, None]).to(dtype)
