"""Per-row integer quantisation of float tensors (int8 or int4), torch only.

This is the codec's own small quantiser; ``kernels/quant`` will provide fused versions
of :func:`quantize_rows` / :func:`dequantize_rows` with the same signatures.

value[i, j] ~= q[i, j] * scale[i], q in [-qmax, qmax] (qmax 127 for int8, 7 for int4),
scale[i] = max_j |x[i, j]| / qmax. Round-to-nearest: |error| <= scale[i] / 2.
Stochastic rounding (unbiased, E[deq] = x): |error| < scale[i].
"""

from __future__ import annotations

import torch

QMAX = {8: 127, 4: 7}


def quantize_rows(x: torch.Tensor, bits: int, stochastic: bool = False,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, C) float -> (q (R, C) int8, scales (R,) float32)."""
    if bits not in QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if x.dim() != 2:
        raise ValueError(f"quantize_rows needs a 2-D tensor, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantise a tensor with non-finite values")
    qmax = QMAX[bits]
    xf = x.detach().float()
    scales = xf.abs().amax(dim=1) / qmax if xf.size(1) else torch.zeros(xf.size(0))
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    y = xf / safe[:, None]
    if stochastic:
        noise = torch.rand(y.shape, generator=generator, dtype=torch.float32)
        q = torch.floor(y + noise)
    else:
        q = torch.round(y)
    q = q.clamp_(-qmax, qmax).to(torch.int8)
    return q, scales.float()


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(q (R, C) int8, scales (R,)) -> (R, C) float32."""
    return q.float() * scales.float()[:, None]


def error_bound(scales: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """Per-row bound on |x - dequantize(quantize(x))|: scale/2 (nearest) or scale (stochastic)."""
    return scales if stochastic else scales / 2
