"""Validation and decoding of a client's ``fedmla.v1.ModelUpdate`` against the task.

:func:`decode_update` either returns a :class:`~coordinator.aggregation.DecodedUpdate`
(float32 tensors) or raises :class:`~coordinator.errors.InvalidArgument` /
:class:`~coordinator.errors.ResourceExhausted` with a message naming the field at
fault. It touches no state. Checked: parameter names are the model's, no name twice,
head selections sorted/unique/in range/active and only on per-head parameters, shapes
agree with the parameter and the head selection, 1 <= rank <= the task's max rank,
dtypes and quantisation schemes allowed, every value and scale finite, importance
(L, H) finite and non-negative, a positive example count, finite metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import TensorDecodeError, decode_int_rows, decode_tensor

from fedmla.protos.spec import ModelSpec

from .aggregation import DecodedUpdate, DenseUpdate, LowRankUpdate
from .errors import InvalidArgument, ResourceExhausted

FLOAT_DTYPES = frozenset({pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16})
MAX_EXAMPLES = 10**12


@dataclass(frozen=True)
class UpdateLimits:
    max_rank: int
    max_update_bytes: int
    active_heads: torch.Tensor | None = None       # (L, H) bool; None = all active
    allowed_dtypes: frozenset[int] = FLOAT_DTYPES
    allow_quantized: bool = True
    metric_names_max: int = 64
    extra: dict = field(default_factory=dict)


def _values(t: pb.Tensor, what: str, max_elements: int, limits: UpdateLimits) -> torch.Tensor:
    """A float32 tensor from a plain or row-quantised message; finite-checked."""
    try:
        if t.HasField("quant") and t.quant.scheme != pb.Quantization.SCHEME_NONE:
            if not limits.allow_quantized:
                raise InvalidArgument(f"{what}: quantised tensors are not allowed in this round", "dtype")
            q, scales, bits = decode_int_rows(t, what, max_elements)
            # Integers times finite scales are finite unless the product overflows:
            # checking the (R,) scales at the largest |q| spares a pass over the values.
            if not torch.isfinite(scales * (127.0 if bits == 8 else 8.0)).all():
                raise InvalidArgument(f"{what}: quantisation scale overflows float32", "non_finite")
            return q.float() * scales[:, None]
        out = decode_tensor(t, what, max_elements, allowed=set(limits.allowed_dtypes)).float()
    except TensorDecodeError as e:
        text = str(e)
        reason = ("dtype" if "dtype" in text else "size" if "limit" in text else
                  "non_finite" if "non-finite" in text else "shape")
        raise InvalidArgument(str(e), reason) from None
    if not torch.isfinite(out).all():
        raise InvalidArgument(f"{what}: contains NaN or infinite values", "non_finite")
    return out


def _heads(sel: pb.HeadSelection, name: str, layer: int, spec: ModelSpec, limits: UpdateLimits) -> tuple[int, ...]:
    heads = tuple(sel.heads)
    H = spec.heads_per_layer[layer]
    if not heads:
        raise InvalidArgument(f"{name}: head selection is empty (omit it to send all heads)", "heads")
    if list(heads) != sorted(set(heads)):
        raise InvalidArgument(f"{name}: head selection {list(heads)} must be sorted and unique", "heads")
    if heads[0] < 0 or heads[-1] >= H:
        raise InvalidArgument(f"{name}: head selection {list(heads)} out of range for layer {layer} with {H} heads", "heads")
    if limits.active_heads is not None:
        inactive = [h for h in heads if not bool(limits.active_heads[layer, h])]
        if inactive:
            raise InvalidArgument(f"{name}: heads {inactive} of layer {layer} are not in this round's active mask", "heads")
    return heads


def _expected_shape(name: str, spec: ModelSpec, heads: tuple[int, ...] | None) -> tuple[int, ...]:
    shape = spec.shapes[name]
    if heads is None:
        return shape
    _, axis, block = spec.per_head(name)
    out = list(shape)
    out[axis] = len(heads) * block
    return tuple(out)


def _check_name(name: str, spec: ModelSpec, seen: set[str], kind: str) -> None:
    if name not in spec.shapes:
        raise InvalidArgument(f"{kind} names unknown parameter {name!r}", "unknown_param")
    if name in seen:
        raise InvalidArgument(f"parameter {name!r} appears more than once in the update", "duplicate_param")
    seen.add(name)


def _selection(msg_has: bool, sel, name: str, spec: ModelSpec, limits: UpdateLimits):
    if not msg_has:
        return None
    ph = spec.per_head(name)
    if ph is None:
        raise InvalidArgument(f"{name}: head selection given for a parameter that is not per-head", "heads")
    return _heads(sel, name, ph[0], spec, limits)


def decode_update(msg: pb.ModelUpdate, spec: ModelSpec, limits: UpdateLimits) -> DecodedUpdate:
    """Validate ``msg`` against the model and the round's limits; decode to float32."""
    if not msg.factors and not msg.dense:
        raise InvalidArgument("update carries no tensors (no factors and no dense updates)", "empty")
    if not 0 < msg.num_examples <= MAX_EXAMPLES:
        raise InvalidArgument(f"num_examples must be in [1, {MAX_EXAMPLES}], got {msg.num_examples}", "num_examples")
    budget = spec.num_elements() * 4  # a sane cap on decoded elements per update
    seen: set[str] = set()
    out = DecodedUpdate(num_examples=int(msg.num_examples))
    for i, f in enumerate(msg.factors):
        _check_name(f.name, spec, seen, f"factors[{i}]")
        shape = spec.shapes[f.name]
        if len(shape) != 2:
            raise InvalidArgument(f"{f.name}: low-rank factors need a 2-D parameter, it is {list(shape)}", "shape")
        if not 1 <= f.rank <= limits.max_rank:
            raise InvalidArgument(f"{f.name}: rank {f.rank} outside [1, max_rank={limits.max_rank}] of this round", "rank")
        heads = _selection(f.HasField("heads"), f.heads, f.name, spec, limits)
        m, n = _expected_shape(f.name, spec, heads)
        left = _values(f.left, f"{f.name}.left", budget, limits)
        right = _values(f.right, f"{f.name}.right", budget, limits)
        if tuple(left.shape) != (m, f.rank) or tuple(right.shape) != (f.rank, n):
            raise InvalidArgument(
                f"{f.name}: factors {list(left.shape)} @ {list(right.shape)} do not match rank {f.rank} and "
                f"shape [{m}, {n}] (left must be [{m}, {f.rank}], right [{f.rank}, {n}])", "shape")
        out.factors[f.name] = LowRankUpdate(left, right, heads)
    for i, d in enumerate(msg.dense):
        _check_name(d.name, spec, seen, f"dense[{i}]")
        heads = _selection(d.HasField("heads"), d.heads, d.name, spec, limits)
        want = _expected_shape(d.name, spec, heads)
        value = _values(d.value, d.name, budget, limits)
        if tuple(value.shape) != want:
            raise InvalidArgument(f"{d.name}: dense update has shape {list(value.shape)}, expected {list(want)}", "shape")
        out.dense[d.name] = DenseUpdate(value, heads)
    if msg.HasField("importance"):
        imp = msg.importance
        L, H = spec.num_layers, spec.num_heads
        if (imp.num_layers, imp.num_heads) != (L, H) or len(imp.scores) != L * H:
            raise InvalidArgument(f"importance is ({imp.num_layers}, {imp.num_heads}) with {len(imp.scores)} scores; "
                                  f"the model needs ({L}, {H}) with {L * H}", "importance")
        scores = torch.tensor(list(imp.scores), dtype=torch.float32).reshape(L, H)
        if not torch.isfinite(scores).all() or (scores < 0).any():
            raise InvalidArgument("importance scores must be finite and non-negative", "importance")
        out.importance = scores
    if len(msg.metrics) > limits.metric_names_max:
        raise ResourceExhausted(f"{len(msg.metrics)} metrics; at most {limits.metric_names_max} allowed", "size")
    for k, v in msg.metrics.items():
        if not math.isfinite(v):
            raise InvalidArgument(f"metric {k!r} is {v}; metrics must be finite", "non_finite")
        out.metrics[k] = float(v)
    return out
