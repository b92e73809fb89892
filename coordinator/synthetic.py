"""Synthetic clients and updates that train nothing (for tests and ``fedmla bench coordinator``).

:func:`synthetic_update` is what a worker's codec would send for a task: the task's codec
config encodes a seeded random pseudo-gradient under the round's plan (active heads,
quantisation, entropy coding), with head importance and a loss. It needs no download, so
it fits any round of a codec whose plan does not depend on earlier rounds (every method
but ``powersgd``). :class:`SyntheticCodecClient` follows a run for real (downloads,
hash checks, error feedback).
"""

from __future__ import annotations

import torch

from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.spec import ModelSpec


def synthetic_update(task: pb.Task, seed: int = 0, num_examples: int = 100, scale: float = 1e-3,
                     name: str = "synthetic") -> pb.ModelUpdate:
    """A codec update that fits ``task``'s round: a seeded random delta of size ~``scale``."""
    from fedmla.mla_model import MLAConfig
    from fedmla.protos.codec import ClientCodec, CodecConfig, SharedState
    from fedmla.protos.codec.transfer import task_plan
    model_cfg = MLAConfig.model_validate_json(task.model_config_json)
    cfg = CodecConfig.model_validate_json(task.codec.config_json)
    if cfg.method == "powersgd":
        raise ValueError("synthetic_update needs the shared bases of a powersgd run: use SyntheticCodecClient")
    shapes = ModelSpec.from_config(model_cfg).shapes
    shared = SharedState.initial(shapes, cfg)
    shared.round = task.model.version
    g = torch.Generator().manual_seed(seed)
    zero = {n: torch.zeros(s) for n, s in shapes.items()}
    local = {n: torch.randn(s, generator=g) * scale for n, s in shapes.items()}
    m = task.active_heads
    importance = torch.rand(m.num_layers, m.num_heads, generator=g)
    codec = ClientCodec(model_cfg, cfg, shapes, name)
    return codec.encode(zero, local, task_plan(task, shared, cfg), importance, num_examples,
                        {"loss": 2.0 + float(torch.rand((), generator=g))})


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
