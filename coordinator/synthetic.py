"""Realistic synthetic updates (for tests and ``fedmla bench coordinator``).

:func:`synthetic_update` builds what a worker's codec would send: every 2-D parameter
as rank-r factors (row-quantised int8/int4, or float32), inactive heads dropped from
per-head parameters, 1-D parameters dense float32, head importance and a loss.
"""

from __future__ import annotations

import torch

from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import encode_int_rows, encode_tensor

from fedmla.protos.spec import ModelSpec


def _quantise(x: torch.Tensor, bits: int) -> pb.Tensor:
    if bits == 0:
        return encode_tensor(x.float())
    qmax = 127 if bits == 8 else 7
    scale = x.abs().amax(dim=1).clamp_min(1e-12) / qmax
    q = torch.round(x / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return encode_int_rows(q, scale.float(), bits)


def synthetic_update(spec: ModelSpec, rank: int = 8, quant_bits: int = 8, seed: int = 0, num_examples: int = 100,
                     active_heads: torch.Tensor | None = None, scale: float = 1e-3) -> pb.ModelUpdate:
    g = torch.Generator().manual_seed(seed)
    msg = pb.ModelUpdate(num_examples=num_examples, metrics={"loss": 2.0 + float(torch.rand((), generator=g))})
    for name, shape in spec.shapes.items():
        heads = None
        ph = spec.per_head(name)
        if ph is not None and active_heads is not None:
            layer, axis, block = ph
            heads = [h for h in range(spec.heads_per_layer[layer]) if bool(active_heads[layer, h])]
            shape = list(shape)
            shape[axis] = len(heads) * block
        if len(shape) == 2:
            r = min(rank, *shape)
            left = torch.randn(shape[0], r, generator=g) * scale
            right = torch.randn(r, shape[1], generator=g)
            f = pb.LowRankFactor(name=name, left=_quantise(left, quant_bits), right=_quantise(right, quant_bits), rank=r)
            if heads is not None:
                f.heads.heads.extend(heads)
            msg.factors.append(f)
        else:
            d = pb.DenseUpdate(name=name, value=encode_tensor(torch.randn(*shape, generator=g) * scale))
            msg.dense.append(d)
    L, H = spec.num_layers, spec.num_heads
    msg.importance.CopyFrom(pb.HeadScores(num_layers=L, num_heads=H, scores=torch.rand(L * H, generator=g).tolist()))
    return msg


class SyntheticCodecClient:
    """A client of a codec run that trains nothing: it keeps the global model and the
    codec's shared state in step through real downloads (full state or downlink chains,
    checked against the model hash) and answers each task with its codec's encoding of a
    seeded pseudo-local model (global + noise), importance included.

    Like ``fedmla worker`` it remembers the bytes it sent for (round, version) and sends
    the same bytes if the coordinator offers that round again (after a coordinator
    restart), so its error-feedback residual stays consistent with what was sent.
    """

    def __init__(self, client, name: str, num_examples: int = 10, scale: float = 1e-2):
        self.client, self.name, self.num_examples, self.scale = client, name, num_examples, scale
        self.state: dict[str, torch.Tensor] | None = None
        self.shared = None
        self.version = None
        self.codec = None
        self.sent: dict[tuple[int, int], bytes] = {}
        self.downloads: list[int] = []      # download kinds, in order

    def sync(self, task: pb.Task, model: pb.ModelVersion | None = None) -> None:
        """Download up to ``model`` (default: the task's model) with the task's codec config."""
        from fedmla.protos.codec import CodecConfig, ClientCodec
        from fedmla.protos.codec.transfer import apply_chain, decode_full_state
        from fedmla.protos.codec.wire import TensorCodec
        from fedmla.mla_model import MLAConfig
        from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb

        from fedmla.protos.weights import model_hash
        model_cfg = MLAConfig.model_validate_json(task.model_config_json)
        cfg = CodecConfig.model_validate_json(task.codec.config_json)
        target = model or task.model
        if self.version == target.version:
            return
        dl = self.client.download(self.version)
        self.downloads.append(dl.kind)
        if dl.kind == cpb.DownloadModelResponse.CODEC_CHAIN:
            chain = cpb.CodecDownlinks.FromString(dl.data)
            tensors = TensorCodec(model_cfg, cfg, {n: tuple(t.shape) for n, t in self.state.items()})
            state, shared = apply_chain(self.state, self.shared, list(chain.downlinks), tensors)
        elif dl.kind == cpb.DownloadModelResponse.CODEC_FULL:
            state, shared = decode_full_state(dl.data, ModelSpec.from_config(model_cfg).shapes)
        else:
            raise AssertionError(f"unexpected download kind {dl.kind} in a codec run")
        if model_hash(state) != dl.model.sha256:
            raise AssertionError(f"{self.name}: weights after download kind {dl.kind} do not match version "
                                 f"{dl.model.version}")
        self.state, self.shared, self.version = state, shared, dl.model.version
        if self.codec is None:
            self.codec = ClientCodec(model_cfg, cfg, {n: tuple(t.shape) for n, t in state.items()}, self.name)

    def update_for(self, task: pb.Task) -> bytes:
        """The serialized update for ``task`` (the same bytes if asked again)."""
        from fedmla.protos.codec.transfer import task_plan
        key = (task.round_id, task.model.version)
        if key in self.sent:
            return self.sent[key]
        self.sync(task)
        g = torch.Generator().manual_seed(task.seed)
        local = {n: t + torch.randn(t.shape, generator=g) * self.scale for n, t in self.state.items()}
        plan = task_plan(task, self.shared, self.codec.cfg)
        m = task.active_heads
        importance = torch.rand(m.num_layers, m.num_heads, generator=g)
        msg = self.codec.encode(self.state, local, plan, importance, self.num_examples, {"loss": 2.0})
        self.sent[key] = msg.SerializeToString()
        return self.sent[key]
