"""How a worker gets (back) in step with the coordinator's codec state: all protobuf.

- full state: a ``ModelUpdate`` whose dense entries are the fp32 global weights (sorted by
  name), plus the codec's shared state (round; for PowerSGD the bases; with
  ``replicate_momentum`` the outer momentum) under
  ``shared/`` names. What a worker downloads when it is new or too far behind; also the
  size of what plain FedAvg sends per client per direction.
- downlink chain: the coordinator's downlink messages of consecutive rounds; a worker
  holding version v applies those of v+1 .. v+k in order with
  :func:`~coordinator.codec.server.apply_downlink`.

Everything decoded here is validated against the model's parameter shapes and raises
:class:`~coordinator.codec.wire.UpdateDecodeError` naming what is wrong.
"""

from __future__ import annotations

import torch

from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import TensorDecodeError, decode_tensor, encode_tensor

from .config import CodecConfig
from .layout import RoundPlan, SharedState
from .server import apply_downlink
from .wire import TensorCodec, UpdateDecodeError

SHARED_PREFIX = "shared/"


def dense_message(state: dict[str, torch.Tensor]) -> pb.ModelUpdate:
    """fp32 weights, sorted by name (what FedAvg in fp32 sends, as a ModelUpdate)."""
    return pb.ModelUpdate(dense=[pb.DenseUpdate(name=n, value=encode_tensor(state[n].detach().float().contiguous()))
                                 for n in sorted(state)])


def encode_full_state(state: dict[str, torch.Tensor], shared: SharedState) -> bytes:
    msg = dense_message(state)
    for name, t in sorted(shared.to_tensors().items()):
        msg.dense.append(pb.DenseUpdate(name=SHARED_PREFIX + name, value=encode_tensor(t.contiguous())))
    return msg.SerializeToString()


def decode_full_state(raw: bytes, shapes: dict[str, tuple[int, ...]]
                      ) -> tuple[dict[str, torch.Tensor], SharedState]:
    """Validated inverse of :func:`encode_full_state` against the model's parameter shapes."""
    try:
        msg = pb.ModelUpdate.FromString(raw)
    except Exception as e:  # protobuf's DecodeError; never pickle
        raise UpdateDecodeError(f"full state is not a serialized ModelUpdate ({e})") from None
    state: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    try:
        for d in msg.dense:
            if d.name.startswith(SHARED_PREFIX):
                shared[d.name[len(SHARED_PREFIX):]] = decode_tensor(d.value, d.name, max_elements=1 << 26,
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
        restored = SharedState.from_tensors(shared)
    except ValueError as e:
        raise UpdateDecodeError(f"full state: {e}") from e
    for name, m in restored.momentum.items():
        if name not in shapes:
            raise UpdateDecodeError(f"full state has momentum for unknown parameter {name!r}")
        if tuple(m.shape) != tuple(shapes[name]) or not torch.isfinite(m).all():
            raise UpdateDecodeError(f"full state momentum {name}: shape {tuple(m.shape)} or values do not fit "
                                    f"the parameter {tuple(shapes[name])}")
    return state, restored


def apply_chain(global_state: dict[str, torch.Tensor], shared: SharedState, downlinks: list[bytes],
                tensors: TensorCodec) -> tuple[dict[str, torch.Tensor], SharedState]:
    """Apply consecutive downlinks (serialized ModelUpdates) in order."""
    for i, raw in enumerate(downlinks):
        try:
            msg = pb.ModelUpdate.FromString(raw)
        except Exception as e:
            raise UpdateDecodeError(f"downlink {i} of the chain is not a serialized ModelUpdate ({e})") from None
        global_state, shared = apply_downlink(global_state, shared, msg, tensors)
    return global_state, shared


def task_plan(task: pb.Task, shared: SharedState, cfg: CodecConfig) -> RoundPlan:
    """The codec plan a worker encodes with: the task's active-head mask and the worker's
    shared state (its round is the model version the task starts from)."""
    m = task.active_heads
    mask = torch.tensor(list(m.active), dtype=torch.bool).view(m.num_layers, m.num_heads)
    return RoundPlan(round=shared.round, mask=mask, shared=shared, send_dense=shared.round % cfg.dense_every == 0)
