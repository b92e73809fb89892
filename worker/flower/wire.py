"""What the Flower apps put in message records besides codec ``ModelUpdate`` bytes: the
round's active-head mask and a full model (resync). All protobuf, never pickle.

- mask: one serialized ``fedmla.v1.HeadSelection`` per layer (the heads active this round),
  the same bytes the communication benchmark counts;
- full state: a ``ModelUpdate`` whose dense entries are the fp32 global weights, plus the
  codec's shared state (round and, for PowerSGD, the bases) under ``shared/`` names. This
  is also the size of what plain FedAvg sends per client per direction.
"""

from __future__ import annotations

import torch

from coordinator.codec import SharedState, UpdateDecodeError
from protos.fedmla.v1 import types_pb2 as pb
from protos.tensors import TensorDecodeError, decode_tensor, encode_tensor

_SHARED = "shared/"


def encode_mask(mask: torch.Tensor) -> list[bytes]:
    """(L, H) bool -> one serialized HeadSelection per layer."""
    return [pb.HeadSelection(heads=row.nonzero().flatten().tolist()).SerializeToString() for row in mask]


def decode_mask(rows: list[bytes], num_layers: int, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`encode_mask`, validated (sorted, unique, in range, one row per layer)."""
    if len(rows) != num_layers:
        raise UpdateDecodeError(f"mask has {len(rows)} layers, the model has {num_layers}")
    mask = torch.zeros(num_layers, num_heads, dtype=torch.bool)
    for layer, raw in enumerate(rows):
        heads = list(pb.HeadSelection.FromString(raw).heads)
        if heads != sorted(set(heads)) or any(h < 0 or h >= num_heads for h in heads):
            raise UpdateDecodeError(f"mask layer {layer}: heads {heads} are not sorted, unique, in [0, {num_heads})")
        mask[layer, heads] = True
    return mask


def dense_message(state: dict[str, torch.Tensor]) -> pb.ModelUpdate:
    """fp32 weights, sorted by name (what FedAvg in fp32 sends, as a ModelUpdate)."""
    return pb.ModelUpdate(dense=[pb.DenseUpdate(name=n, value=encode_tensor(state[n].detach().float().contiguous()))
                                 for n in sorted(state)])


def encode_full_state(state: dict[str, torch.Tensor], shared: SharedState) -> bytes:
    msg = dense_message(state)
    for name, t in sorted(shared.to_tensors().items()):
        msg.dense.append(pb.DenseUpdate(name=_SHARED + name, value=encode_tensor(t.contiguous())))
    return msg.SerializeToString()


def decode_full_state(raw: bytes, shapes: dict[str, tuple[int, ...]]
                      ) -> tuple[dict[str, torch.Tensor], SharedState]:
    """Validated inverse of :func:`encode_full_state` against the model's parameter shapes."""
    msg = pb.ModelUpdate.FromString(raw)
    state: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    try:
        for d in msg.dense:
            if d.name.startswith(_SHARED):
                shared[d.name[len(_SHARED):]] = decode_tensor(d.value, d.name, max_elements=1 << 26,
                                                             allowed={pb.FLOAT32, pb.INT8, pb.INT64})
                continue
            if d.name not in shapes:
                raise UpdateDecodeError(f"full state has unknown parameter {d.name!r}")
            if d.name in state:
                raise UpdateDecodeError(f"full state repeats {d.name!r}")
            t = decode_tensor(d.value, d.name, max_elements=1 << 28, allowed={pb.FLOAT32})
            if tuple(t.shape) != tuple(shapes[d.name]):
                raise UpdateDecodeError(f"full state {d.name}: shape {tuple(t.shape)}, expected {shapes[d.name]}")
            if not torch.isfinite(t).all():
                raise UpdateDecodeError(f"full state {d.name}: non-finite values")
            state[d.name] = t.clone()
    except TensorDecodeError as e:
        raise UpdateDecodeError(str(e)) from e
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise UpdateDecodeError(f"full state lacks {missing[:5]}")
    try:
        return state, SharedState.from_tensors(shared)
    except ValueError as e:
        raise UpdateDecodeError(f"full state: {e}") from e
