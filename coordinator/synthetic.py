"""Realistic synthetic updates (for tests and ``fedmla bench coordinator``).

:func:`synthetic_update` builds what a worker's codec would send: every 2-D parameter
as rank-r factors (row-quantised int8/int4, or float32), inactive heads dropped from
per-head parameters, 1-D parameters dense float32, head importance and a loss.
"""

from __future__ import annotations

import torch

from protos.fedmla.v1 import types_pb2 as pb
from protos.tensors import encode_int_rows, encode_tensor

from .validation import ModelSpec


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
