"""Rotary position embedding as in DeepSeek-V3: adjacent pairs rotated as complex numbers."""

from __future__ import annotations

import torch


def precompute_freqs_cis(rope_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """Unit complex rotations, shape (max_seq_len, rope_dim // 2), complex64."""
    inv = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim))
    t = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(t, inv)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, [heads,] rope_dim) by freqs_cis (T, rope_dim // 2).

    Pairs (x[2i], x[2i+1]) are treated as one complex number, as in DeepSeek-V3's
    ``apply_rotary_emb``. Works for (B, T, H, D) and (B, T, D). Computed in fp32.
    """
    dtype = x.dtype
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    if x.dim() == 4:
        f = freqs_cis.view(1, xc.size(1), 1, xc.size(-1))
    else:
        f = freqs_cis.view(1, xc.size(1), xc.size(-1))
    return torch.view_as_real(xc * f).flatten(-2).to(dtype)
