"""What is sent for each tensor in a round, and the math both sides share.

Shared state (identical on the coordinator and every worker, derived only from the
config, the seed and the downlinks everybody received):

- :class:`SharedState`: the round number and, for ``method='powersgd'``, one orthonormal
  basis per low-rank tensor. A ``left`` basis (m, r) spans rows: a client sends
  C = B^T X (r, n). A ``right`` basis (n, r) spans columns: a client sends (X B)^T (r, m).
  After each round the basis moves to the other side, computed from the received
  downlink factor (one step of power iteration per round, warm-started forever).
- :class:`RoundPlan`: the shared state plus the coordinator's active-head mask and
  whether dense tensors travel this round.

Factors are row-major (r, m) / (r, n) with x ~= left.T @ right, so each rank component is
one quantisation row. (The proto's ``LowRankFactor.left`` therefore holds L^T, (r, m').)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedmla.mla_model import MLAConfig

from ..seeds import derive_seed

from .config import CodecConfig
from .heads import head_axis, head_index
from .lowrank import orthonormalize, random_basis, randomized_svd


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass
class Basis:
    side: Literal["left", "right"]
    matrix: torch.Tensor  # (m, r) for left, (n, r) for right; orthonormal columns, float32


def is_lowrank(shape: tuple[int, ...], cfg: CodecConfig) -> bool:
    return cfg.method != "dense" and len(shape) == 2 and min(shape) >= cfg.min_lowrank_dim


@dataclass
class SharedState:
    """Round counter, shared bases and (``replicate_momentum``) the outer momentum;
    equal everywhere at the start of every round."""

    round: int
    bases: dict[str, Basis] = field(default_factory=dict)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def initial(cls, shapes: dict[str, tuple[int, ...]], cfg: CodecConfig) -> "SharedState":
        bases = {}
        if cfg.method == "powersgd":
            for name in sorted(shapes):
                shape = tuple(shapes[name])
                if is_lowrank(shape, cfg):
                    bases[name] = Basis("right", random_basis(shape[1], cfg.rank, generator(cfg.seed, "basis0", name)))
        return cls(round=0, bases=bases)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict (safetensors-friendly) for checkpoints and for resyncing a worker."""
        out = {"round": torch.tensor([self.round], dtype=torch.int64)}
        for name, b in self.bases.items():
            out[f"basis/{name}"] = b.matrix.clone()
            out[f"basis_side/{name}"] = torch.tensor([0 if b.side == "left" else 1], dtype=torch.int8)
        for name, m in self.momentum.items():
            out[f"momentum/{name}"] = m.clone()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "SharedState":
        if "round" not in tensors:
            raise ValueError("shared codec state lacks 'round'")
        bases = {}
        for key, t in tensors.items():
            if key.startswith("basis/"):
                name = key[len("basis/"):]
                side = tensors.get(f"basis_side/{name}")
                if side is None:
                    raise ValueError(f"shared codec state lacks the side of the basis of {name!r}")
                bases[name] = Basis("left" if int(side[0]) == 0 else "right", t.clone().float().contiguous())
        momentum = {k[len("momentum/"):]: t.clone().float().contiguous()
                    for k, t in tensors.items() if k.startswith("momentum/")}
        return cls(round=int(tensors["round"][0]), bases=bases, momentum=momentum)

    def digest(self) -> str:
        h = hashlib.sha256(str(self.round).encode())
        for name in sorted(self.bases):
            b = self.bases[name]
            h.update(f"{name}|{b.side}|{tuple(b.matrix.shape)}".encode())
            h.update(b.matrix.contiguous().numpy().tobytes())
        for name in sorted(self.momentum):
            m = self.momentum[name]
            h.update(f"momentum|{name}|{tuple(m.shape)}".encode())
            h.update(m.contiguous().numpy().tobytes())
        return h.hexdigest()


@dataclass
class RoundPlan:
    """Everything a worker needs, besides the global weights, to encode its update."""

    round: int
    mask: torch.Tensor            # (L, H) bool: active heads this round
    shared: SharedState
    send_dense: bool = True


@dataclass
class Selection:
    """Sub-matrix of a tensor covered by an update: heads and the row/column indices they own."""

    heads: list[int] | None = None
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            x = x.index_select(0, self.rows)
        if self.cols is not None:
            x = x.index_select(1, self.cols)
        return x

    def scatter(self, sub: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if self.rows is None and self.cols is None:
            return sub.reshape(shape)
        out = torch.zeros(shape, dtype=sub.dtype)
        if self.rows is not None:
            out.index_copy_(0, self.rows, sub)
        else:
            out.index_copy_(1, self.cols, sub)
        return out

    def sub_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        s = list(shape)
        if self.rows is not None:
            s[0] = self.rows.numel()
        if self.cols is not None:
            s[1] = self.cols.numel()
        return tuple(s)


def selection_for(name: str, shape: tuple[int, ...], model_cfg: MLAConfig, cfg: CodecConfig,
                  mask: torch.Tensor | None) -> Selection:
    """Rows/columns of active heads for per-head tensors; everything otherwise.

    No selection travels when head selection is off or every head of the layer is active.
    """
    if mask is None or not cfg.head_selection:
        return Selection()
    where = head_axis(name, model_cfg)
    if where is None:
        return Selection()
    layer, axis, block = where
    heads = [int(h) for h in mask[layer].nonzero().flatten().tolist()]
    if len(heads) == shape[axis] // block:
        return Selection()
    idx = head_index(heads, block)
    return Selection(heads=heads, rows=idx if axis == 0 else None, cols=idx if axis == 1 else None)


def effective_basis(basis: Basis, sel: Selection) -> torch.Tensor:
    """The basis restricted to the selected rows (left) / columns (right), re-orthonormalised."""
    idx = sel.rows if basis.side == "left" else sel.cols
    if idx is None:
        return basis.matrix
    return orthonormalize(basis.matrix.index_select(0, idx))


def compress(x: torch.Tensor, side: str | None, b: torch.Tensor | None, rank: int, cfg: CodecConfig,
             gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """x (m', n'), already restricted to the selection -> (left (r, m') | None, right (r, n') | None).

    With a shared basis ``b`` (already restricted, see :func:`effective_basis`) only the
    free factor is computed: side ``left`` gives right = b^T x; side ``right`` gives
    left = (x b)^T. Without one (``side`` None), a seeded rank-``rank`` randomised SVD
    gives both.
    """
    if side is None:
        return randomized_svd(x, rank, cfg.svd_oversample, cfg.svd_power_iters, gen, rotate=cfg.rotate_factors)
    if side == "left":
        return None, (b.t() @ x).contiguous()
    return (x @ b).t().contiguous(), None


def factor_pair(left: torch.Tensor | None, right: torch.Tensor | None, side: str | None,
                b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) whose matrix product a @ c is the (m', n') product of the factors."""
    if side is None:
        return left.t(), right
    if side == "left":
        return b, right
    return left.t(), b.t()


def reconstruct(left: torch.Tensor | None, right: torch.Tensor | None, side: str | None,
                b: torch.Tensor | None) -> torch.Tensor:
    """The (m', n') product of (dequantised) factors, float32."""
    a, c = factor_pair(left, right, side, b)
    return a @ c
