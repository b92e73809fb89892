"""coordinator/defenses.py on real codec updates with known contents."""

import pytest
import torch

from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec
from fedmla.coordinator.defenses import DefenseConfig, DPAggregator, RobustAggregator, noise_std
from fedmla.coordinator.privacy import DPConfig
from fedmla.mla_model import MLAConfig, MLATransformer
from fedmla.protos.fedmla.v1 import types_pb2 as pb

MODEL = MLAConfig.preset("tiny")
# Dense, unquantised, all heads: what a client sends is exactly its delta, so expectations are exact.
EXACT = CodecConfig(method="dense", factor_bits=0, dense_bits=0, head_selection=False, dense_every=1)


def setup(cfg=EXACT):
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in MLATransformer(MODEL).state_dict().items()}
    server = ServerCodec(MODEL, cfg, state)
    return server, state, server.plan()


def decoded(server, state, plan, delta_scale, name="c", importance=None, seed=0, n=10, direction=None):
    """A client's decoded update whose delta is direction * delta_scale (direction: a fixed random unit-ish field)."""
    g = torch.Generator().manual_seed(seed)
    direction = direction or {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    local = {k: state[k] + delta_scale * direction[k] for k in state}
    codec = ClientCodec(MODEL, server.cfg, {k: tuple(v.shape) for k, v in state.items()}, name)
    msg = codec.encode(state, local, plan, importance, n)
    return server.decode(pb.ModelUpdate.FromString(msg.SerializeToString()), plan), direction


def agg(cls_cfg, server, plan):
    a = RobustAggregator(server.shapes, server.num_layers, server.num_heads, cls_cfg)
    a.begin_round(server.global_state, plan)
    return a


def test_median_and_trimmed_mean_ignore_outliers_exactly():
    server, state, plan = setup()
    first, d = decoded(server, state, plan, 1.0, "a")
    ups = {"a": first}
    for name, s in [("b", 2.0), ("c", 3.0), ("d", -50.0), ("e", 400.0)]:
        ups[name] = decoded(server, state, plan, s, name, direction=d)[0]
    med = agg(DefenseConfig(kind="median"), server, plan)
    trim = agg(DefenseConfig(kind="trimmed_mean", trim=1), server, plan)
    for c, u in ups.items():
        med.add(c, u)
        trim.add(c, decoded(server, state, plan, {"a": 1.0, "b": 2.0, "c": 3.0, "d": -50.0, "e": 400.0}[c], c,
                            direction=d)[0])
    m, t = med.finish(), trim.finish()
    for k in state:
        # median of {1, 2, 3, -50, 400} x d is 2 d; trimmed mean (drop one at each end) of it is (1+2+3)/3 d = 2 d
        assert torch.allclose(m[k], 2.0 * d[k], rtol=1e-5, atol=1e-6), k
        assert torch.allclose(t[k], 2.0 * d[k], rtol=1e-5, atol=1e-6), k


@pytest.mark.parametrize("kind", ["median", "trimmed_mean"])
def test_coordinatewise_in_small_blocks_equals_the_whole_stack_reference(kind):
    """Column blocks of a few hundred values (many per parameter) give the bits of the
    reference that sorts every client's dense float64 parameter at once."""
    from fedmla.coordinator import robust
    server, state, plan = setup(CodecConfig())           # the default codec: low-rank, 3-bit, head selection
    ups = {}
    for i, c in enumerate("abcdef"):
        g = torch.Generator().manual_seed(100 + i)
        ups[c] = decoded(server, state, plan, 0.01 * (i + 1), c, seed=100 + i,
                         direction={k: torch.randn(v.shape, generator=g) for k, v in state.items()})[0]
    a = agg(DefenseConfig(kind=kind, trim=2), server, plan)
    a.block_bytes = 20 * len(ups) * 300                   # 300 columns per block
    for c, u in ups.items():
        a.add(c, u)
    got = a.finish()
    dense = [{k: p.dense(server.shapes[k]).double() for k, p in ups[c].tensors.parts.items()} for c in sorted(ups)]
    want = robust.coordinate_median(dense) if kind == "median" else robust.trimmed_mean(dense, 2)
    assert set(want) <= set(got)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    for k in set(got) - set(want):                       # no client sent it: zero
        assert not got[k].any(), k


def test_clip_bounds_each_update_by_a_multiple_of_the_median_norm():
    server, state, plan = setup()
    a = agg(DefenseConfig(kind="clip", clip_multiple=2.0), server, plan)
    u1, d = decoded(server, state, plan, 1.0, "a")
    a.add("a", u1, 10)
    a.add("b", decoded(server, state, plan, 1.0, "b", direction=d)[0], 10)
    a.add("c", decoded(server, state, plan, 100.0, "c", direction=d)[0], 10)
    out = a.finish()
    # norms 1, 1, 100 (x |d|): median |d|, bound 2|d|; c is scaled to 2 d -> mean (1 + 1 + 2) / 3 d
    for k in state:
        assert torch.allclose(out[k], (4.0 / 3.0) * d[k], rtol=1e-5, atol=1e-6), k


def test_krum_keeps_the_honest_cluster_and_refusal_of_huge_norms():
    server, state, plan = setup()
    a = agg(DefenseConfig(kind="krum", byzantine=1), server, plan)
    u, d = decoded(server, state, plan, 1.0, "h0")
    a.add("h0", u)
    for i, s in enumerate([1.01, 0.99, 1.02]):
        a.add(f"h{i + 1}", decoded(server, state, plan, s, f"h{i + 1}", direction=d)[0])
    a.add("evil", decoded(server, state, plan, -30.0, "evil", direction=d)[0])
    out = a.finish()
    assert "evil" not in a.selected and len(a.selected) == 4
    for k in state:
        assert torch.allclose(out[k], d[k] * (1 + 1.01 + 0.99 + 1.02) / 4, rtol=1e-4, atol=1e-6), k

    # Without any robust kind, a norm 1e6 x the median is refused and named.
    b = agg(DefenseConfig(kind="none"), server, plan)
    for i in range(3):
        b.add(f"h{i}", decoded(server, state, plan, 1.0, f"h{i}", direction=d)[0])
    b.add("huge", decoded(server, state, plan, 5e6, "huge", direction=d)[0])
    out = b.finish()
    assert set(b.rejected) == {"huge"} and "median norm" in b.rejected["huge"]
    for k in state:
        assert torch.allclose(out[k], d[k], rtol=1e-5, atol=1e-6), k


def test_inflated_importance_cannot_take_the_mask():
    cfg = CodecConfig(keep_ratio=0.5, explore_heads=0)
    server, state, plan = setup(cfg)
    L, H = server.num_layers, server.num_heads
    honest = torch.tensor([[4.0, 3.0, 1.0, 0.5]] * L)          # heads 0 and 1 matter
    liar = torch.tensor([[0.0, 0.0, 1e6, 1e6]] * L)            # claims heads 2 and 3, hugely
    robust_agg = agg(DefenseConfig(kind="median"), server, plan)
    plain = server.aggregator(plan)
    for i in range(4):
        u = decoded(server, state, plan, 0.01, f"h{i}", importance=honest, seed=i)[0]
        robust_agg.add(f"h{i}", u)
        plain.add(f"h{i}", decoded(server, state, plan, 0.01, f"h{i}", importance=honest, seed=i)[0])
    robust_agg.add("liar", decoded(server, state, plan, 0.01, "liar", importance=liar, seed=9)[0])
    plain.add("liar", decoded(server, state, plan, 0.01, "liar", importance=liar, seed=9)[0])
    from fedmla.protos.codec.heads import select_heads
    g = torch.Generator().manual_seed(0)
    taken = select_heads(plain.importance(), 0.5, 0, g, L, H)
    kept = select_heads(robust_agg.importance(), 0.5, 0, g, L, H)
    assert taken[:, 2:].all(), "without the defence the liar's heads win (the test's premise)"
    assert kept[:, :2].all() and not kept[:, 2:].any()


def test_dp_clips_each_client_and_adds_seeded_noise_of_the_right_scale():
    server, state, plan = setup()
    dp = DPConfig(clip_norm=1.0, noise_multiplier=0.5)
    u, d = decoded(server, state, plan, 1.0, "a")
    norm_d = torch.sqrt(sum((d[k].double() ** 2).sum() for k in d)).item()
    ups = [("a", u)] + [(c, decoded(server, state, plan, s, c, direction=d)[0]) for c, s in [("b", 1.0), ("c", 1.0)]]

    def run(seed, expected=4):
        a = DPAggregator(server.shapes, server.num_layers, server.num_heads, dp, expected_clients=expected, seed=seed)
        a.begin_round(server.global_state, plan)
        for c, x in ups:
            a.add(c, x)
        return a.finish(), a
    out, a = run(7)
    again, _ = run(7)
    other, _ = run(8)
    assert all(torch.equal(out[k], again[k]) for k in out)            # reproducible (restart-safe)
    assert not all(torch.equal(out[k], other[k]) for k in out)
    # each delta has norm |d| > 1 = C: clipped to d / |d|; three of them over an expected four
    assert all(s == pytest.approx(1.0 / norm_d, rel=1e-4) for s in a.clip_scales.values())
    resid = torch.cat([(out[k].double() - 0.75 * d[k].double() / norm_d).flatten() for k in out])
    assert resid.std().item() == pytest.approx(noise_std(dp, 4), rel=0.05)   # ~98k coordinates
    assert abs(resid.mean().item()) < 5 * noise_std(dp, 4) / resid.numel() ** 0.5
