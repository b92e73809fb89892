"""The aggregation interface and the plain FedAvg baseline.

The coordinator hands an :class:`Aggregator` the validated, decoded updates of one
round **one at a time, in client-id order** (it spools the raw updates to disk while
the round is open and replays them sorted at the close, so a restarted run sums in the
same order as an uninterrupted one and gets bit-identical weights). An aggregator must
keep O(model) memory whatever the number of clients: fold each update into an
accumulator in ``add`` and drop it.

Interface (a ``typing.Protocol``; any object with these methods works)::

    agg.begin_round(global_state, task)         # state: {name: fp32 tensor}, task: RoundContext
    agg.add(client_id, update, num_examples)    # update: DecodedUpdate; called once per client
    new_state = agg.finish()                    # {name: fp32 tensor}: the next global model

``finish`` returns the complete next global state (not a delta); tensors it does not
touch must still be present (return the global tensor). Weighted by ``num_examples``.

Shapes: a :class:`LowRankUpdate` of parameter ``W`` (m, n) carries ``left`` (m', r)
and ``right`` (r, n'); m' = m and n' = n unless ``heads`` selects a subset of a per-head
parameter's row blocks (``wq_b``/``wq``/``wkv_b``: m' = len(heads) * block) or column
blocks (``wo``: n' = len(heads) * block). :func:`dense_delta` expands either kind to the
full (m, n) with zeros for the heads not sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class LowRankUpdate:
    left: torch.Tensor    # (m', r) float32
    right: torch.Tensor   # (r, n') float32
    heads: tuple[int, ...] | None = None


@dataclass(frozen=True)
class DenseUpdate:
    value: torch.Tensor   # the parameter's shape, or its selected head blocks; float32
    heads: tuple[int, ...] | None = None


@dataclass
class DecodedUpdate:
    """One client's validated update, dequantised to float32."""

    factors: dict[str, LowRankUpdate] = field(default_factory=dict)
    dense: dict[str, DenseUpdate] = field(default_factory=dict)
    importance: torch.Tensor | None = None   # (L, H) float32
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundContext:
    """What an aggregator may need to know about the round it aggregates."""

    round_id: int
    model_version: int
    # {per-head parameter name: (axis, block size)}: where each head's rows/columns are.
    head_blocks: Mapping[str, tuple[int, int]]
    active_heads: torch.Tensor | None = None      # (L, H) bool
    codec: Mapping[str, str] = field(default_factory=dict)
    server_lr: float = 1.0


@runtime_checkable
class Aggregator(Protocol):
    def begin_round(self, global_state: Mapping[str, torch.Tensor], task: RoundContext) -> None: ...

    def add(self, client_id: str, update: DecodedUpdate, num_examples: int) -> None: ...

    def finish(self) -> dict[str, torch.Tensor]: ...


def _head_index(heads: tuple[int, ...], block: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * block, (h + 1) * block) for h in heads])


def dense_delta(name: str, shape: tuple[int, ...], part: LowRankUpdate | DenseUpdate,
                head_blocks: Mapping[str, tuple[int, int]]) -> torch.Tensor:
    """The full-shape float32 delta of one parameter (zeros where heads were not sent)."""
    value = part.left @ part.right if isinstance(part, LowRankUpdate) else part.value
    if part.heads is None:
        return value.reshape(shape).float()
    axis, block = head_blocks[_suffix(name)]
    out = torch.zeros(shape, dtype=torch.float32)
    out.index_copy_(axis, _head_index(part.heads, block), value.float())
    return out


def _suffix(name: str) -> str:
    parts = name.split(".", 2)
    return parts[2] if len(parts) == 3 and parts[0] == "layers" else name


class FedAvg:
    """Plain FedAvg: new = global + server_lr * sum_k(n_k * delta_k) / sum_k n_k.

    Accumulates in float64 (one accumulator per touched parameter: O(model)); updates
    are dense-expanded one parameter at a time, so a client's update is never held
    as a full dense model.
    """

    def __init__(self, server_lr: float | None = None):
        self.server_lr = server_lr
        self._global: Mapping[str, torch.Tensor] | None = None

    def begin_round(self, global_state, task: RoundContext) -> None:
        self._global = global_state
        self._task = task
        self._acc: dict[str, torch.Tensor] = {}
        self._weight = 0.0
        self._clients: list[str] = []

    def add(self, client_id: str, update: DecodedUpdate, num_examples: int) -> None:
        if self._global is None:
            raise RuntimeError("add() before begin_round()")
        if num_examples <= 0:
            raise ValueError(f"client {client_id}: num_examples must be positive, got {num_examples}")
        w = float(num_examples)
        for name, part in [*update.factors.items(), *update.dense.items()]:
            g = self._global[name]
            d = dense_delta(name, tuple(g.shape), part, self._task.head_blocks)
            acc = self._acc.get(name)
            if acc is None:
                acc = self._acc[name] = torch.zeros(g.shape, dtype=torch.float64)
            acc.add_(d.double(), alpha=w)
        self._weight += w
        self._clients.append(client_id)

    def finish(self) -> dict[str, torch.Tensor]:
        if self._global is None:
            raise RuntimeError("finish() before begin_round()")
        lr = self.server_lr if self.server_lr is not None else self._task.server_lr
        out = {}
        for name, g in self._global.items():
            acc = self._acc.get(name)
            if acc is None or self._weight == 0:
                out[name] = g.clone()
            else:
                out[name] = (g.double() + lr * acc / self._weight).to(g.dtype)
        self._global = None
        self._acc = {}
        return out
