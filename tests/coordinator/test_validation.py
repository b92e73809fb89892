"""Every class of bad ModelUpdate is refused by decode_update with a typed error."""

import math

import pytest
import torch

from fedmla.coordinator.errors import InvalidArgument, ResourceExhausted
from fedmla.coordinator.synthetic import synthetic_update
from fedmla.coordinator.validation import ModelSpec, UpdateLimits, decode_update
from fedmla.mla_model import MLAConfig
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import encode_tensor

SPEC = ModelSpec.from_config(MLAConfig.preset("tiny"))
LIMITS = UpdateLimits(max_rank=16, max_update_bytes=1 << 20)


def good(**kw):
    return synthetic_update(SPEC, rank=4, seed=1, **kw)


def factor(msg, name):
    return next(f for f in msg.factors if f.name == name)


def test_good_update_decodes_to_float32_with_expected_shapes():
    u = decode_update(good(), SPEC, LIMITS)
    f = u.factors["layers.0.attn.wkv_b.weight"]
    assert f.left.shape == (SPEC.shapes["layers.0.attn.wkv_b.weight"][0], 4) and f.left.dtype == torch.float32
    assert u.importance.shape == (SPEC.num_layers, SPEC.num_heads)
    assert set(u.factors) | set(u.dense) == set(SPEC.shapes)


def test_head_selected_update_decodes():
    mask = torch.zeros(SPEC.num_layers, SPEC.num_heads, dtype=torch.bool)
    mask[:, [0, 2]] = True
    u = decode_update(good(active_heads=mask), SPEC, UpdateLimits(max_rank=16, max_update_bytes=1 << 20, active_heads=mask))
    wo = u.factors["layers.1.attn.wo.weight"]
    assert wo.heads == (0, 2) and wo.right.shape[1] == 2 * MLAConfig.preset("tiny").v_head_dim


def _mutations():
    def unknown_name(m):
        m.factors[0].name = "layers.9.attn.nope.weight"

    def duplicate(m):
        m.dense.append(m.dense[0])

    def bad_shape(m):
        f = factor(m, "layers.0.attn.wo.weight")
        f.left.CopyFrom(encode_tensor(torch.zeros(5, f.rank)))

    def rank_too_high(m):
        f = factor(m, "layers.0.ffn.w1.weight")
        rows, cols = SPEC.shapes[f.name]
        f.rank = 32
        f.left.CopyFrom(encode_tensor(torch.zeros(rows, 32)))
        f.right.CopyFrom(encode_tensor(torch.zeros(32, cols)))

    def rank_field_mismatch(m):
        factor(m, "layers.0.ffn.w1.weight").rank = 3

    def bad_dtype(m):
        shape = SPEC.shapes[m.dense[0].name]
        m.dense[0].value.CopyFrom(encode_tensor(torch.zeros(shape, dtype=torch.int64)))

    def nan_value(m):
        shape = SPEC.shapes[m.dense[0].name]
        m.dense[0].value.CopyFrom(encode_tensor(torch.full(shape, math.nan)))

    def inf_scale(m):
        f = factor(m, "layers.0.attn.wq_a.weight")
        sc = torch.ones(f.left.shape[0])
        sc[0] = math.inf
        f.left.quant.scales.CopyFrom(encode_tensor(sc))

    def truncated_bytes(m):
        f = factor(m, "layers.0.attn.wq_a.weight")
        f.right.data = f.right.data[:-3]

    def heads_out_of_range(m):
        f = factor(m, "layers.0.attn.wo.weight")
        f.heads.heads.extend([0, 7])

    def heads_on_plain_param(m):
        factor(m, "layers.0.ffn.w1.weight").heads.heads.append(0)

    def factor_of_1d(m):
        name = m.dense[0].name
        m.factors.append(pb.LowRankFactor(name=name, rank=1, left=encode_tensor(torch.zeros(SPEC.shapes[name][0], 1)),
                                          right=encode_tensor(torch.zeros(1, 1))))
        del m.dense[0]

    def bad_importance(m):
        m.importance.scores[0] = -1.0

    def importance_shape(m):
        m.importance.num_heads = 3

    def zero_examples(m):
        m.num_examples = 0

    def nan_metric(m):
        m.metrics["loss"] = math.nan

    def empty(m):
        del m.factors[:]
        del m.dense[:]

    return {k: v for k, v in locals().items()}


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_bad_update_is_invalid_argument(name):
    m = good()
    _mutations()[name](m)
    with pytest.raises(InvalidArgument) as e:
        decode_update(m, SPEC, LIMITS)
    assert e.value.message and e.value.code == "INVALID_ARGUMENT"


def test_inactive_head_refused():
    mask = torch.ones(SPEC.num_layers, SPEC.num_heads, dtype=torch.bool)
    mask[0, 1] = False
    m = good()  # sends all heads of wo in one piece, but head 1 of layer 0 is not active
    f = factor(m, "layers.0.attn.wo.weight")
    f.heads.heads.extend(range(SPEC.num_heads))
    with pytest.raises(InvalidArgument, match="not in this round's active mask"):
        decode_update(m, SPEC, UpdateLimits(max_rank=16, max_update_bytes=1 << 20, active_heads=mask))


def test_too_many_metrics_resource_exhausted():
    m = good()
    for i in range(100):
        m.metrics[f"m{i}"] = 1.0
    with pytest.raises(ResourceExhausted):
        decode_update(m, SPEC, LIMITS)


def test_scale_that_overflows_when_dequantised_refused():
    m = good()
    f = factor(m, "layers.0.attn.wq_a.weight")
    sc = torch.ones(f.left.shape[0])
    sc[0] = 3.0e38   # finite, but 127 * scale is not
    f.left.quant.scales.CopyFrom(encode_tensor(sc))
    with pytest.raises(InvalidArgument, match="overflows"):
        decode_update(m, SPEC, LIMITS)
