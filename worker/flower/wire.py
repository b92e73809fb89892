"""What the Flower apps put in message records besides codec ``ModelUpdate`` bytes: the
round's active-head mask and a full model (resync). All protobuf, never pickle.

- mask: one serialized ``fedmla.v1.HeadSelection`` per layer (the heads active this round),
  the same bytes the communication benchmark counts;
- full state: :mod:`fedmla.protos.codec.transfer` (fp32 weights + the codec's shared state,
  the same bytes a gRPC worker downloads when it resyncs).
"""

from __future__ import annotations

import torch

from fedmla.protos.codec import UpdateDecodeError
from fedmla.protos.codec.transfer import decode_full_state, dense_message, encode_full_state
from fedmla.protos.fedmla.v1 import types_pb2 as pb

__all__ = ["encode_mask", "decode_mask", "dense_message", "encode_full_state", "decode_full_state"]


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
