"""The plan's bounds on an update (issue 15): every honest encoding fits them exactly
where it must, whatever the codec config, so the coordinator can refuse anything larger
before reading or inflating it."""

import pytest
import torch

from fedmla.mla_model import MLAConfig, MLATransformer
from fedmla.protos.codec import ClientCodec, CodecConfig, DecodeLimits, ServerCodec, UpdateDecodeError

CONFIGS = {
    "default": CodecConfig(),
    "fedavg": CodecConfig.fedavg(),
    "powersgd": CodecConfig(method="powersgd", powersgd_warmup_rounds=1),
    "8-bit, float32 scales": CodecConfig(factor_bits=8, half_scales=False, entropy_coding=False),
    "2-bit, dense every 2": CodecConfig(factor_bits=2, dense_every=2, keep_ratio=0.25),
    "4-bit, fp32 dense": CodecConfig(factor_bits=4, dense_bits=0),
    "topk": CodecConfig(method="topk", topk_chunk=256, topk_k=8),
    "ffn rank, early rank": CodecConfig(rank=4, ffn_rank=9, ffn_downlink_rank=2, early_rounds=2, early_rank=16,
                                        early_downlink_rank=6),
    "late rank": CodecConfig(embed_rank=7, late_from=1, late_rank=3, late_downlink_rank=5),
    "topk, fp32 values, top-k downlink": CodecConfig(method="topk", topk_chunk=300, topk_k=300, topk_bits=0,
                                                     entropy_coding=False, topk_downlink="topk"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_honest_updates_fit_the_plan_bounds(name):
    cfg = CONFIGS[name]
    mc = MLAConfig.preset("tiny")
    model = MLATransformer(mc)
    model.reset_parameters(torch.Generator().manual_seed(0))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    server = ServerCodec(mc, cfg, state)
    client = ClientCodec(mc, cfg, server.shapes, "a")
    g = torch.Generator().manual_seed(1)
    metrics = {f"metric_{i:02d}" + "x" * 50: 1.0 for i in range(32)}       # the most metrics the limits allow
    for _ in range(3):
        plan = server.plan()
        local = {n: t + torch.randn(t.shape, generator=g) * 1e-2 for n, t in server.global_state.items()}
        msg = client.encode(server.global_state, local, plan, torch.rand(mc.n_layers, mc.n_heads, generator=g),
                            DecodeLimits().max_examples, metrics)
        size, bound = len(msg.SerializeToString()), server.max_update_bytes(plan)
        assert size <= bound, (name, plan.round, size, bound)
        dec = server.decode(msg, plan)
        elements = sum(sum(t.numel() for t in (p.left, p.right, p.value) if t is not None)
                       for p in dec.tensors.parts.values())
        assert elements == server.tensors.decoded_elements(plan)
        agg = server.aggregator(plan)
        agg.add("a", dec)
        server.finish_round(plan, agg.finish(), agg.importance())


def test_decode_limits_are_settable():
    mc = MLAConfig.preset("tiny")
    state = {k: v.detach().clone() for k, v in MLATransformer(mc).state_dict().items()}
    server = ServerCodec(mc, CodecConfig(), state, limits=DecodeLimits(max_examples=5, max_metrics=1))
    plan = server.plan()
    msg = ClientCodec(mc, CodecConfig(), server.shapes, "a").encode(state, state, plan, None, 6, {"loss": 1.0})
    with pytest.raises(UpdateDecodeError, match=r"num_examples must be in \[1, 5\]"):
        server.decode(msg, plan)
    msg.num_examples = 5
    msg.metrics["other"] = 2.0
    with pytest.raises(UpdateDecodeError, match="2 metrics; at most 1"):
        server.decode(msg, plan)
