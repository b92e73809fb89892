"""Head importance across clients and rounds, and the active-head mask.

Pure functions on (L, H) tensors:

- :func:`combine_importance`: example-weighted mean of the clients' per-layer-normalised
  scores for one round;
- :func:`update_importance`: exponential moving average over rounds;
- :func:`select_heads`: the next round's mask, top-k heads per layer by importance
  (k = ceil(keep_ratio * H), ties to the lower index) plus ``explore`` heads drawn
  uniformly at random (seeded) from the rest, so an inactive head can come back.
"""

from __future__ import annotations

import math

import torch

from fedmla.mla_model import MLAConfig, head_blocks


def combine_importance(scores: list[torch.Tensor], num_examples: list[int]) -> torch.Tensor:
    """sum_k n_k s_k / sum_k n_k over clients; each s_k (L, H). Returns float64 (L, H)."""
    if not scores or len(scores) != len(num_examples):
        raise ValueError(f"need one example count per score tensor, got {len(scores)} and {len(num_examples)}")
    total = sum(num_examples)
    if total <= 0 or any(n < 0 for n in num_examples):
        raise ValueError(f"example counts must be >= 0 with a positive sum, got {num_examples}")
    shape = scores[0].shape
    acc = torch.zeros(shape, dtype=torch.float64)
    for s, n in zip(scores, num_examples):
        if s.shape != shape:
            raise ValueError(f"importance shapes differ: {tuple(s.shape)} vs {tuple(shape)}")
        acc += s.double() * n
    return acc / total


def update_importance(previous: torch.Tensor | None, current: torch.Tensor, ema: float) -> torch.Tensor:
    """I_t = ema * I_{t-1} + (1 - ema) * current; the first round takes ``current``."""
    if previous is None:
        return current.double().clone()
    return ema * previous.double() + (1.0 - ema) * current.double()


def heads_to_keep(num_heads: int, keep_ratio: float) -> int:
    return max(1, min(num_heads, math.ceil(keep_ratio * num_heads - 1e-9)))


def select_heads(importance: torch.Tensor | None, keep_ratio: float, explore: int,
                 generator: torch.Generator, num_layers: int | None = None,
                 num_heads: int | None = None) -> torch.Tensor:
    """Active-head mask (L, H) bool.

    With no importance yet (round 0) every head is active. Otherwise per layer the
    top k = ceil(keep_ratio * H) heads (stable: equal scores keep the lower index) and
    then ``explore`` more chosen uniformly from the remaining heads with ``generator``.
    """
    if importance is None:
        if num_layers is None or num_heads is None:
            raise ValueError("select_heads without importance needs num_layers and num_heads")
        return torch.ones(num_layers, num_heads, dtype=torch.bool)
    L, H = importance.shape
    k = heads_to_keep(H, keep_ratio)
    mask = torch.zeros(L, H, dtype=torch.bool)
    for layer in range(L):
        order = sorted(range(H), key=lambda h: (-float(importance[layer, h]), h))
        top = order[:k]
        mask[layer, top] = True
        rest = sorted(order[k:])
        if rest and explore > 0:
            pick = torch.randperm(len(rest), generator=generator)[: min(explore, len(rest))]
            mask[layer, [rest[i] for i in pick.tolist()]] = True
    return mask


def head_axis(name: str, cfg: MLAConfig) -> tuple[int, int, int] | None:
    """(layer, axis, block) if ``name`` is a per-head parameter, else None."""
    if not name.startswith("layers."):
        return None
    _, layer, suffix = name.split(".", 2)
    blocks = head_blocks(cfg)
    if suffix not in blocks:
        return None
    axis, size = blocks[suffix]
    return int(layer), axis, size


def head_index(heads: list[int], block: int) -> torch.Tensor:
    """Row (or column) indices covered by ``heads`` with ``block`` rows (columns) each, sorted."""
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * block, (h + 1) * block) for h in sorted(heads)])
