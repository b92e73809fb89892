"""Coordinator side of the codec: decode, exact aggregation, outer optimiser, downlink.

Flow of one round (``fedavg`` or DiLoCo ``nesterov`` outer step)::

    plan = server.plan()                                     # mask + shared bases + round
    agg = server.aggregator(plan)                            # begin_round
    for each reply: agg.add(client_id, server.decode(msg, plan), msg.num_examples)
    down = server.finish_round(plan, agg.finish(), agg.importance())   # -> ModelUpdate
    # every worker: global, shared = apply_downlink(global, shared, down, ...)
    assert model_hash(global) == server.global_hash()

The coordinator applies its own downlink with the same :func:`apply_downlink` the
workers run, so everybody ends the round with bit-identical weights and bases.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch

from fedmla.mla_model import MLAConfig
from fedmla.protos.fedmla.v1 import types_pb2 as pb

from ..limits import clip
from ..weights import model_hash
from . import blas
from .batch_decode import decode_tensors, plan_table
from .config import CodecConfig
from .exact import ExactSum
from .heads import combine_importance, select_heads, update_importance
from .layout import Basis, RoundPlan, Selection, SharedState, factor_pair, generator
from .lowrank import basis_from_factor
from .wire import DecodedTensors, TensorCodec, UpdateDecodeError


class DecodedUpdate:
    """A validated client update: compact tensors, importance (L, H) or None, example count, metrics."""

    def __init__(self, tensors: DecodedTensors, importance: torch.Tensor | None, num_examples: int,
                 metrics: dict[str, float]):
        self.tensors = tensors
        self.importance = importance
        self.num_examples = num_examples
        self.metrics = metrics


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on the non-tensor fields of a client update (tensors are bounded by the plan).

    ``max_examples``: the largest example count a client may report (its weight in the
    mean); ``max_metrics`` entries, each name at most ``max_metric_name_chars`` long."""

    max_examples: int = 1_000_000
    max_metrics: int = 32
    max_metric_name_chars: int = 64

    def metrics_bytes(self) -> int:
        """Serialized size of the largest metrics map these limits allow (map-entry framing,
        a UTF-8 name of up to 4 bytes a character, a double)."""
        return self.max_metrics * (16 + 4 * self.max_metric_name_chars)


def decode_importance(msg: pb.HeadScores, num_layers: int, num_heads: int) -> torch.Tensor:
    if msg.num_layers != num_layers or msg.num_heads != num_heads:
        raise UpdateDecodeError(f"importance is {msg.num_layers}x{msg.num_heads}, the model has "
                                f"{num_layers} layers x {num_heads} heads")
    if len(msg.scores) != num_layers * num_heads:
        raise UpdateDecodeError(f"importance has {len(msg.scores)} scores, expected {num_layers * num_heads}")
    # numpy: ~10x fewer microseconds than torch.tensor(list(...)) and two torch checks.
    # float64 -> float32 rounds to nearest as torch.tensor(..., dtype=float32) does (values
    # past float32's range become infinite, and are refused, in both).
    with np.errstate(over="ignore"):
        a = np.fromiter(msg.scores, np.float64, len(msg.scores)).astype(np.float32)
    if not np.isfinite(a).all() or (a < 0).any():
        raise UpdateDecodeError("importance scores must be finite and >= 0")
    return torch.from_numpy(a).view(num_layers, num_heads)


class ExactAggregator:
    """Example-weighted mean of the clients' reconstructed updates, exact for what was sent.

    Each client's factors are multiplied out (left^T @ right, or basis @ factor, float32,
    on one BLAS thread whichever thread adds: :mod:`.blas`)
    and added at once, weighted by its example count, to an :class:`~.exact.ExactSum`
    (:meth:`~.exact.ExactSum.add_scaled`): integer limbs on a fixed grid, so the sum is
    the same bits whatever order the updates arrive in (and from whichever thread: each
    parameter has its own lock, so two threads add at once), and an update can be taken out
    again exactly (:meth:`remove`). Memory is O(model) whatever the number of clients:
    nothing of an update is kept after ``add`` but its weight and importance. Never
    mean(B) @ mean(A).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], num_layers: int, num_heads: int):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.num_layers, self.num_heads = num_layers, num_heads
        self.plan: RoundPlan | None = None
        self._lock = threading.Lock()

    def begin_round(self, global_state: dict[str, torch.Tensor] | None, plan: RoundPlan) -> None:
        self.plan = plan
        self._sum = ExactSum(self.shapes)
        self._weights: dict[str, int] = {}
        self._adding: set[str] = set()
        self._imp: dict[str, torch.Tensor] = {}
        self._locks = {name: threading.Lock() for name in self.shapes}
        self._local = threading.local()          # per thread: the products' scratch

    def _products(self, update: DecodedUpdate):
        # The float32 tensor each part stands for, on its selection's rows/columns only (the
        # low-rank product is formed here, outside any lock; the zeros elsewhere are never
        # made: they would add nothing); times an integer weight < 2**29 it is exact in
        # float64, which ExactSum.add_scaled relies on. A low-rank product is written into
        # this thread's scratch (valid until the next one is formed): a fresh allocation
        # per product (~25 MB per update on the small preset) cost page faults and the
        # memory's churn; torch.mm with out= is the same MKL call, so the same bits as
        # Part.product (tests/codec/test_exact_sum.py).
        for name, part in update.tensors.parts.items():
            if part.value is not None:
                yield name, part.product(), part.sel
                continue
            a, b = factor_pair(part.left, part.right, part.side, part.basis)
            yield name, torch.mm(a, b, out=self._scratch(a.size(0), b.size(1))), part.sel

    def _scratch(self, m: int, n: int) -> torch.Tensor:
        """An (m, n) float32 tensor at the start of this thread's scratch buffer (64-byte
        aligned, as a fresh torch tensor)."""
        local = self._local
        buf = getattr(local, "buf", None)
        if buf is None or buf.numel() < m * n:
            buf = local.buf = torch.empty(max(m * n, max(math.prod(s) for s in self.shapes.values())),
                                          dtype=torch.float32)
        return buf[:m * n].view(m, n)

    def _sum_in(self, name: str, x: torch.Tensor, sel: Selection, weight: int, sign: int = 1) -> float:
        """Add (take out) one tensor's term; the sum of the squares of ``x`` (see add_scaled)."""
        with self._locks[name]:          # one lock per parameter: threads contend only on the same one
            return self._sum.add_scaled(name, x, weight, sign, rows=sel.rows, cols=sel.cols)

    def add(self, client_id: str, update: DecodedUpdate, num_examples: int | None = None) -> None:
        """Sum the update in now, one tensor at a time (temporaries of one tensor, not of
        the model); on an error nothing of it stays in the sum."""
        if self.plan is None:
            raise RuntimeError("call begin_round before add")
        n = update.num_examples if num_examples is None else int(num_examples)
        if n <= 0:
            raise ValueError(f"client {client_id!r}: num_examples must be positive, got {n}")
        with self._lock:
            if client_id in self._weights or client_id in self._adding:
                raise ValueError(f"client {client_id!r} already contributed to round {self.plan.round}")
            self._adding.add(client_id)
        done: list[str] = []
        try:
            with blas.single_thread():           # the products' bits, whichever thread adds
                try:
                    for name, x, sel in self._products(update):
                        self._sum_in(name, x, sel, n)        # refuses a term past the bound before summing any of it
                        del x
                        done.append(name)
                except BaseException:
                    for name, x, sel in self._products(update):
                        if name in done:
                            self._sum_in(name, x, sel, n, sign=-1)
                    raise
        except BaseException:
            with self._lock:
                self._adding.discard(client_id)
            raise
        with self._lock:
            self._adding.discard(client_id)
            self._weights[client_id] = n
            if update.importance is not None:
                self._imp[client_id] = update.importance

    def remove(self, client_id: str, update: DecodedUpdate) -> None:
        """Take a client's update out again (exactly): the same update ``add`` was given."""
        with self._lock:
            n = self._weights.pop(client_id)
            self._imp.pop(client_id, None)
        with blas.single_thread():
            for name, x, sel in self._products(update):
                self._sum_in(name, x, sel, n, sign=-1)

    def reweight(self, client_id: str, update: DecodedUpdate, weight: int) -> None:
        """Give a client's update another weight (exactly): the same update ``add`` was given."""
        old = self._weights[client_id]
        if weight == old:
            return
        imp = self._imp.get(client_id)
        self.remove(client_id, update)
        update.importance = imp
        self.add(client_id, update, weight)

    @property
    def num_clients(self) -> int:
        return len(self._weights)

    def finish(self) -> dict[str, torch.Tensor]:
        """Weighted mean pseudo-gradient per parameter (float32, full shapes)."""
        if not self._weights:
            raise ValueError("no client updates to aggregate")
        total = sum(self._weights.values())
        return {n: (self._sum.value(n) / total).float() for n in self.shapes}

    def importance(self) -> torch.Tensor | None:
        """Example-weighted mean of the reported importance (L, H) float64, or None."""
        if not self._imp:
            return None
        ids = sorted(self._imp)
        return combine_importance([self._imp[c] for c in ids], [self._weights[c] for c in ids])


def outer_step(cfg: CodecConfig, delta: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(global step, new momentum) from an aggregated pseudo-gradient.

    fedavg: step = lr * delta (lr 1 is FedAvg). nesterov (DiLoCo): m = mu m + delta;
    step = lr (delta + mu m). A pure function of its inputs, so parties that replicate
    the momentum get the same bits.
    """
    lr, mu = cfg.outer_lr, cfg.outer_momentum
    if cfg.outer == "fedavg":
        return {n: lr * d for n, d in delta.items()}, {}
    out, new = {}, {}
    for n, d in delta.items():
        m = momentum.get(n)
        m = d.clone() if m is None else mu * m + d
        new[n] = m
        out[n] = lr * (d + mu * m)
    return out, new


class OuterOptimizer:
    """The coordinator's outer optimiser when it sends whole steps (see :func:`outer_step`)."""

    def __init__(self, cfg: CodecConfig):
        self.cfg = cfg
        self.momentum: dict[str, torch.Tensor] = {}

    def step(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, self.momentum = outer_step(self.cfg, delta, self.momentum)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.momentum.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.momentum = {n: t.clone() for n, t in state.items()}


def _downlink_plan(shared: SharedState, send_dense: bool) -> RoundPlan:
    return RoundPlan(round=shared.round, mask=None, shared=shared, send_dense=send_dense)


def apply_downlink(global_state: dict[str, torch.Tensor], shared: SharedState, msg: pb.ModelUpdate,
                   tensors: TensorCodec) -> tuple[dict[str, torch.Tensor], SharedState]:
    """(new global weights, new shared state) after a downlink; run identically by the
    coordinator and every worker. Raises :class:`UpdateDecodeError` on a bad message."""
    cfg = tensors.cfg
    send_dense = shared.round % cfg.dense_every == 0
    decoded = tensors.decode(msg.factors, msg.dense, _downlink_plan(shared, send_dense), uplink=False)
    new_state, momentum = {}, {}
    if cfg.replicate_momentum:
        # The downlink is the aggregated delta; every party takes the outer step itself.
        received = {name: (decoded.parts[name].dense(tensors.shapes[name]) if name in decoded.parts
                           else torch.zeros(tensors.shapes[name])) for name in global_state}
        step, momentum = outer_step(cfg, received, shared.momentum)
        new_state = {name: (t.float() + step[name]).to(t.dtype) for name, t in global_state.items()}
    else:
        for name, t in global_state.items():
            part = decoded.parts.get(name)
            new_state[name] = t if part is None else (t.float() + part.dense(tensors.shapes[name])).to(t.dtype)
    bases = {}
    for name, basis in shared.bases.items():
        part = decoded.parts.get(name)
        if part is None:
            raise UpdateDecodeError(f"downlink lacks the factor of {name!r}")
        gen = generator(cfg.seed, "basis", shared.round + 1, name)
        if part.side is None:      # an svd round (powersgd warm-up): start from the right factor's row space
            bases[name] = Basis("right", basis_from_factor(part.right, gen))
        elif basis.side == "left":   # received right (r, n): next basis spans columns
            bases[name] = Basis("right", basis_from_factor(part.right, gen))
        else:                      # received left (r, m): next basis spans rows
            bases[name] = Basis("left", basis_from_factor(part.left, gen))
    return new_state, SharedState(round=shared.round + 1, bases=bases, momentum=momentum)


class ServerCodec:
    """The coordinator's codec state: global weights, shared bases, importance moving
    average, outer momentum and the server-side error-feedback residual."""

    def __init__(self, model_cfg: MLAConfig, cfg: CodecConfig, global_state: dict[str, torch.Tensor],
                 limits: DecodeLimits | None = None):
        self.limits = limits or DecodeLimits()
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.global_state = {n: t.detach().clone().float() for n, t in global_state.items()}
        self.shapes = {n: tuple(t.shape) for n, t in self.global_state.items()}
        self.tensors = TensorCodec(model_cfg, cfg, self.shapes)
        self.shared = SharedState.initial(self.shapes, cfg)
        self.importance: torch.Tensor | None = None   # (L, H) float64 moving average
        self.outer = OuterOptimizer(cfg)
        self.residual: dict[str, torch.Tensor] = {}
        self.num_layers = model_cfg.n_layers
        self.num_heads = model_cfg.n_heads

    # ---- per round -----------------------------------------------------------------------------
    def plan(self) -> RoundPlan:
        """This round's plan. The mask is a function of (importance, seed, round) only."""
        r = self.shared.round
        mask = select_heads(self.importance if self.cfg.head_selection else None, self.cfg.keep_ratio,
                            self.cfg.explore_heads, generator(self.cfg.seed, "explore", r),
                            self.num_layers, self.num_heads)
        return RoundPlan(round=r, mask=mask, shared=self.shared, send_dense=r % self.cfg.dense_every == 0)

    def aggregator(self, plan: RoundPlan) -> ExactAggregator:
        agg = ExactAggregator(self.shapes, self.num_layers, self.num_heads)
        agg.begin_round(self.global_state, plan)
        return agg

    def decode(self, msg: pb.ModelUpdate, plan: RoundPlan) -> DecodedUpdate:
        """Validate a client's ModelUpdate against the plan; raises UpdateDecodeError."""
        if plan.round != self.shared.round:
            raise UpdateDecodeError(f"update for round {plan.round}, the coordinator is at round {self.shared.round}")
        lim = self.limits
        if not 0 < msg.num_examples <= lim.max_examples:
            raise UpdateDecodeError(f"num_examples must be in [1, {lim.max_examples}] (max_num_examples), "
                                    f"got {msg.num_examples}")
        metrics = self.decode_metrics(msg)
        # Nothing to aggregate is refused before anything is decoded; unknown or repeated
        # names are refused by the tensor decoder (each tensor bounded by its plan shape),
        # and a partial update (which would count as zeros at full weight) after it.
        if not msg.factors and not msg.dense:
            raise UpdateDecodeError("update holds no tensors: nothing to aggregate")
        # what the plan expects, worked out once per plan (with the fast path's table)
        expected = plan_table(self.tensors, plan).expected
        # one compiled pass when the update is well-formed; otherwise (and without numba) the
        # per-tensor decoder, which refuses what it refuses with its own message
        tensors = decode_tensors(self.tensors, msg.factors, msg.dense, plan)
        if tensors is None:
            tensors = self.tensors.decode(msg.factors, msg.dense, plan, uplink=True)
        missing = sorted(set(expected) - set(tensors.parts))
        if missing:
            raise UpdateDecodeError(f"update lacks {len(missing)} of the plan's {len(expected)} tensors "
                                    f"(first: {missing[0]})")
        imp = decode_importance(msg.importance, self.num_layers, self.num_heads) if msg.HasField("importance") else None
        return DecodedUpdate(tensors, imp, int(msg.num_examples), metrics)

    def decode_metrics(self, msg: pb.ModelUpdate) -> dict[str, float]:
        """The update's metrics, bounded in count and name length, finite."""
        lim = self.limits
        if len(msg.metrics) > lim.max_metrics:
            raise UpdateDecodeError(f"{len(msg.metrics)} metrics; at most {lim.max_metrics} allowed (max_metrics)")
        metrics = {}
        for k, v in msg.metrics.items():
            if not k or len(k) > lim.max_metric_name_chars or not k.isprintable():
                raise UpdateDecodeError(f"metric name {clip(k)} must be 1-{lim.max_metric_name_chars} printable "
                                        f"characters (max_metric_name_chars)")
            if not math.isfinite(v):
                raise UpdateDecodeError(f"metric {clip(k)} is {v}; metrics must be finite")
            metrics[k] = float(v)
        return metrics

    def max_update_bytes(self, plan: RoundPlan) -> int:
        """The largest serialized update a client can send for ``plan`` under these limits."""
        return self.tensors.max_update_bytes(plan, uplink=True, metrics_bytes=self.limits.metrics_bytes())

    def finish_round(self, plan: RoundPlan, aggregate: dict[str, torch.Tensor],
                     importance: torch.Tensor | None) -> pb.ModelUpdate:
        """Outer step, compressed downlink (with server error feedback); applies it to the
        coordinator's own global weights. Returns the downlink message for every worker."""
        if plan.round != self.shared.round:
            raise ValueError(f"plan is for round {plan.round}, the coordinator is at round {self.shared.round}")
        # replicate_momentum: send the aggregate itself; apply_downlink takes the outer step.
        step = dict(aggregate) if self.cfg.replicate_momentum else self.outer.step(aggregate)
        if self.cfg.error_feedback:
            beta = self.cfg.server_residual_decay
            step = {n: s + beta * self.residual[n] if n in self.residual else s for n, s in step.items()}
        gen = generator(self.cfg.seed, "downlink", plan.round)
        dplan = _downlink_plan(self.shared, plan.send_dense)
        factors, dense, sent = self.tensors.encode(step, dplan, uplink=False, gen=gen)
        if self.cfg.error_feedback:
            self.residual = {n: (s - sent[n]) if n in sent else s for n, s in step.items()}
        msg = pb.ModelUpdate(factors=factors, dense=dense)
        self.global_state, self.shared = apply_downlink(self.global_state, self.shared, msg, self.tensors)
        if importance is not None:
            self.importance = update_importance(self.importance, importance, self.cfg.importance_ema)
        return msg

    # ---- checkpoint / restart ----------------------------------------------------------------
    def state_dict(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """Everything the coordinator needs to resume bit-identically, as a flat tensor dict
        (safetensors-friendly): global weights, shared state, importance, momentum, residual.
        ``copy=False`` shares the tensors (to serialize them at once without a second copy)."""
        c = (lambda t: t.clone()) if copy else (lambda t: t)
        out = {f"global/{n}": c(t) for n, t in self.global_state.items()}
        out.update({f"shared/{k}": v for k, v in self.shared.to_tensors().items()})
        out.update({f"momentum/{n}": c(t) for n, t in self.outer.momentum.items()})
        out.update({f"residual/{n}": c(t) for n, t in self.residual.items()})
        if self.importance is not None:
            out["importance"] = c(self.importance)
        return out

    def snapshot(self) -> tuple:
        """The codec's state by reference, for :meth:`restore` after a failed round. Cheap:
        a round replaces these objects (``finish_round`` writes into none of them)."""
        return (self.global_state, self.shared, self.outer.momentum, self.residual, self.importance)

    def restore(self, snapshot: tuple) -> None:
        self.global_state, self.shared, self.outer.momentum, self.residual, self.importance = snapshot

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        def group(prefix):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        glob = group("global/")
        if set(glob) != set(self.shapes):
            raise ValueError(f"checkpoint parameters differ from the model: "
                             f"{sorted(set(glob) ^ set(self.shapes))[:5]}")
        for n, t in glob.items():
            if tuple(t.shape) != self.shapes[n]:
                raise ValueError(f"checkpoint {n}: shape {tuple(t.shape)}, expected {self.shapes[n]}")
        self.global_state = {n: t.clone().float() for n, t in glob.items()}
        self.shared = SharedState.from_tensors(group("shared/"))
        self.outer.load_state_dict(group("momentum/"))
        self.residual = {n: t.clone() for n, t in group("residual/").items()}
        self.importance = state["importance"].clone().double() if "importance" in state else None

    def global_hash(self) -> str:
        return model_hash(self.global_state)
