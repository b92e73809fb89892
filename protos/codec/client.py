"""Worker side of the codec: pseudo-gradient -> ``ModelUpdate``, with error feedback.

Per round a worker calls :meth:`ClientCodec.encode` once with the global weights it
started from, its new local weights, its head importance and example count. Its
residual (what earlier rounds did not send: dropped heads, the part outside the rank-r
factors, quantisation error, dense tensors held back) is added before compressing and
replaced by what this round does not send. The sum is preserved exactly:
``delta + old_residual == sent + new_residual`` (up to float32 rounding of one subtraction).
"""

from __future__ import annotations

import torch

from fedmla.mla_model import MLAConfig
from fedmla.protos.fedmla.v1 import types_pb2 as pb

from .config import CodecConfig
from .layout import RoundPlan, generator
from .wire import TensorCodec


def encode_importance(scores: torch.Tensor) -> pb.HeadScores:
    """(L, H) float -> HeadScores (row-major)."""
    L, H = scores.shape
    return pb.HeadScores(num_layers=L, num_heads=H, scores=[float(v) for v in scores.flatten().tolist()])


class ClientCodec:
    """One per client (it owns that client's error-feedback residual).

    ``client_key`` (any stable string, e.g. the client id) seeds stochastic rounding and
    randomised SVD probes together with the config seed and the round.
    """

    def __init__(self, model_cfg: MLAConfig, cfg: CodecConfig, shapes: dict[str, tuple[int, ...]], client_key: str):
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.client_key = client_key
        self.tensors = TensorCodec(model_cfg, cfg, shapes)
        self.residual: dict[str, torch.Tensor] = {}

    def pseudo_gradient(self, global_state: dict[str, torch.Tensor], local_state: dict[str, torch.Tensor]
                        ) -> dict[str, torch.Tensor]:
        """delta = local - global (+ residual), float32, for every parameter."""
        out = {}
        for name, shape in self.tensors.shapes.items():
            if name not in local_state or name not in global_state:
                raise KeyError(f"state is missing {name!r}")
            d = local_state[name].detach().float() - global_state[name].detach().float()
            if name in self.residual:
                d = d + self.cfg.residual_decay * self.residual[name]
            out[name] = d
        return out

    def encode(self, global_state: dict[str, torch.Tensor], local_state: dict[str, torch.Tensor], plan: RoundPlan,
               importance: torch.Tensor | None, num_examples: int, metrics: dict[str, float] | None = None
               ) -> pb.ModelUpdate:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        delta = self.pseudo_gradient(global_state, local_state)
        gen = generator(self.cfg.seed, "uplink", self.client_key, plan.round)
        factors, dense, sent = self.tensors.encode(delta, plan, uplink=True, gen=gen)
        if self.cfg.error_feedback:
            self.residual = {n: (d - sent[n]) if n in sent else d for n, d in delta.items()}
        msg = pb.ModelUpdate(factors=factors, dense=dense, num_examples=int(num_examples),
                             metrics=dict(metrics or {}))
        if importance is not None:
            msg.importance.CopyFrom(encode_importance(importance))
        return msg

    # Residuals are client state worth checkpointing (a worker that restarts without it
    # silently loses what it had not sent yet).
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.residual.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residual = {n: t.clone().float() for n, t in state.items()}
