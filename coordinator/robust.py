"""Robust aggregation of client updates: norm clipping, coordinate-wise median and
trimmed mean, Multi-Krum, and robust combining of head-importance scores.

An update is a mapping from parameter name to either a dense tensor or a low-rank
pair ``(left (m, r), right (r, n))`` standing for ``left @ right``. Norms and
pairwise distances of low-rank updates are computed from the factors without forming
the products: for P = B1 A1 and Q = B2 A2,

    <P, Q>_F = sum((B1^T B2) * (A1 A2^T))      (r1 x r2 matrices)

so Multi-Krum over n clients costs O(n^2 r^2 (m + n)) rather than O(n^2 m n).
All reductions run in float64 and in sorted client order, so the result does not
depend on the order updates arrived in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Union

import torch

Factor = tuple[torch.Tensor, torch.Tensor]
Entry = Union[torch.Tensor, Factor]
Update = Mapping[str, Entry]


def _is_factor(x: Entry) -> bool:
    return isinstance(x, tuple)


def dense(x: Entry) -> torch.Tensor:
    """The full tensor an entry stands for, float64."""
    if _is_factor(x):
        left, right = x
        return left.double() @ right.double()
    return x.double()


def entry_inner(x: Entry, y: Entry) -> float:
    """Frobenius inner product <x, y> of two entries of the same parameter."""
    if _is_factor(x) and _is_factor(y):
        (b1, a1), (b2, a2) = x, y
        return float(((b1.double().T @ b2.double()) * (a1.double() @ a2.double().T)).sum())
    return float((dense(x) * dense(y)).sum())


def update_inner(u: Update, v: Update) -> float:
    """<u, v> summed over the parameters both updates carry."""
    return sum(entry_inner(u[k], v[k]) for k in sorted(u.keys() & v.keys()))


def update_norm(u: Update) -> float:
    return math.sqrt(max(update_inner(u, u), 0.0))


def scale_update(u: Update, factor: float) -> dict[str, Entry]:
    """factor * u (for low-rank entries only the left factor is scaled)."""
    out: dict[str, Entry] = {}
    for k, x in u.items():
        out[k] = (x[0] * factor, x[1]) if _is_factor(x) else x * factor
    return out


def clip_update(u: Update, max_norm: float) -> tuple[dict[str, Entry], float]:
    """u scaled to Frobenius norm at most max_norm; returns (clipped, scale applied)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = update_norm(u)
    scale = 1.0 if norm <= max_norm else max_norm / norm
    return scale_update(u, scale), scale


def pairwise_sq_distances(updates: Sequence[Update]) -> torch.Tensor:
    """(n, n) float64 matrix of ||u_i - u_j||^2 over the union of parameter names."""
    n = len(updates)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = update_inner(updates[i], updates[j])
    sq = gram.diag()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0.0)


def multi_krum_select(updates: Sequence[Update], num_byzantine: int, num_selected: int | None = None) -> list[int]:
    """Indices chosen by Multi-Krum (Blanchard et al. 2017).

    Each update's score is the sum of squared distances to its n - f - 2 nearest
    neighbours; the ``num_selected`` (default n - f) lowest scores are kept. Ties are
    broken by index so the choice is deterministic.
    """
    n, f = len(updates), num_byzantine
    if n == 0:
        raise ValueError("Multi-Krum needs at least one update")
    if f < 0 or n - f - 2 < 1:
        raise ValueError(f"Multi-Krum needs n - f - 2 >= 1, got n={n}, f={f}")
    m = n - f if num_selected is None else num_selected
    if not 1 <= m <= n:
        raise ValueError(f"num_selected must be in [1, {n}], got {m}")
    d = pairwise_sq_distances(updates)
    d.fill_diagonal_(float("inf"))
    nearest = d.sort(dim=1).values[:, : n - f - 2]
    scores = nearest.sum(dim=1)
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return sorted(order[:m])


def weighted_mean(updates: Sequence[Update], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i u_i / sum_i w_i as dense float32 tensors (every update carries every key)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    keys = sorted(set().union(*(u.keys() for u in updates)))
    out = {}
    for k in keys:
        acc = None
        for u, w in zip(updates, weights):
            if k in u:
                term = dense(u[k]) * (w / total)
                acc = term if acc is None else acc + term
        out[k] = acc.float()
    return out


def coordinate_median(updates: Sequence[Update]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median, parameter by parameter (memory: n x the largest parameter).

    For an even number of clients the mean of the two middle values is used.
    """
    keys = sorted(set().union(*(u.keys() for u in updates)))
    out = {}
    for k in keys:
        stack = torch.stack([dense(u[k]) for u in updates if k in u])
        s = stack.sort(dim=0).values
        n = s.size(0)
        out[k] = (s[(n - 1) // 2] + s[n // 2]).mul(0.5).float()
    return out


def trimmed_mean(updates: Sequence[Update], trim: int) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the ``trim`` largest and smallest values."""
    n = len(updates)
    if trim < 0 or 2 * trim >= n:
        raise ValueError(f"trim must satisfy 0 <= 2*trim < n={n}, got trim={trim}")
    keys = sorted(set().union(*(u.keys() for u in updates)))
    out = {}
    for k in keys:
        stack = torch.stack([dense(u[k]) for u in updates if k in u])
        s = stack.sort(dim=0).values
        out[k] = s[trim: s.size(0) - trim].mean(dim=0).float()
    return out


def robust_importance(scores: Sequence[torch.Tensor], method: str = "median", trim: int = 0) -> torch.Tensor:
    """Combine clients' (L, H) head-importance scores so that a liar cannot take over.

    Each client's scores are first re-normalised to unit L2 norm per layer (so
    inflating the magnitude buys nothing), then combined coordinate-wise by
    ``median`` or ``trimmed`` mean.
    """
    if not scores:
        raise ValueError("no importance scores to combine")
    stack = torch.stack([s.double().clamp_min(0.0) for s in scores])
    norms = stack.norm(dim=-1, keepdim=True)
    stack = torch.where(norms > 0, stack / norms.clamp_min(1e-300), stack)
    srt = stack.sort(dim=0).values
    n = srt.size(0)
    if method == "median":
        return ((srt[(n - 1) // 2] + srt[n // 2]) * 0.5).float()
    if method == "trimmed":
        if trim < 0 or 2 * trim >= n:
            raise ValueError(f"trim must satisfy 0 <= 2*trim < n={n}, got trim={trim}")
        return srt[trim: n - trim].mean(dim=0).float()
    raise ValueError(f"unknown importance method {method!r}; use 'median' or 'trimmed'")
