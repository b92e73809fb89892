"""Low-rank building blocks: orthonormal bases and a seeded randomised SVD.

Factors are kept row-major as (r, m) and (r, n) so that x ~= left.T @ right, and each
rank component is one quantisation row (one scale each) on the wire.
"""

from __future__ import annotations

import torch


def orthonormalize(m: torch.Tensor) -> torch.Tensor:
    """(n, r) -> (n, min(n, r)) with orthonormal columns (reduced QR in float64).

    Signs are fixed (diag(R) >= 0) so the result is a deterministic function of ``m``.
    """
    q, r = torch.linalg.qr(m.double(), mode="reduced")
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return (q * sign[None, :]).float().contiguous()


def random_basis(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """(n, min(n, r)) orthonormal, from the generator."""
    return orthonormalize(torch.randn(n, r, generator=generator, dtype=torch.float64))


def basis_from_factor(rows: torch.Tensor, generator: torch.Generator, jitter: float = 1e-4) -> torch.Tensor:
    """Next shared basis (n, r) from a received factor (r, n): orthonormalise its rows.

    A seeded jitter (relative to the factor's scale) keeps the basis full rank when a
    component is zero (for example, a tensor that has not changed yet).
    """
    r, n = rows.shape
    scale = float(rows.double().abs().max()) if rows.numel() else 0.0
    noise = torch.randn(n, r, generator=generator, dtype=torch.float64)
    return orthonormalize(rows.double().t() + noise * (jitter * scale + 1e-30))


def randomized_svd(x: torch.Tensor, rank: int, oversample: int, power_iters: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x (m, n) -> (left (r, m), right (r, n)) with x ~= left.T @ right, r = min(rank, m, n).

    Halko-Martinsson-Tropp with a seeded Gaussian probe; the singular values are split
    evenly (sqrt) between the factors so both quantise with similar row scales.
    """
    m, n = x.shape
    r = min(rank, m, n)
    xd = x.double()
    k = min(r + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, dtype=torch.float64)
    y = xd @ omega
    q, _ = torch.linalg.qr(y)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(xd.t() @ q)
        q, _ = torch.linalg.qr(xd @ z)
    b = q.t() @ xd                                   # (k, n)
    u, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ u[:, :r]                                 # (m, r)
    root = s[:r].sqrt()
    return (u * root[None, :]).t().float().contiguous(), (vh[:r] * root[:, None]).float().contiguous()
