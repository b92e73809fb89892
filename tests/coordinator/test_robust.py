import math

import pytest
import torch

from fedmla.coordinator.robust import (clip_update, coordinate_median, dense, multi_krum_select, pairwise_sq_distances,
                                robust_importance, trimmed_mean, update_inner, update_norm, weighted_mean)


def lowrank(seed, m=6, n=5, r=2, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=g) * scale, torch.randn(r, n, generator=g))


def test_lowrank_inner_product_equals_dense():
    a, b = lowrank(1), lowrank(2, r=3)
    u = {"w": a, "v": torch.tensor([1.0, 2.0])}
    v = {"w": b, "v": torch.tensor([3.0, -1.0])}
    expected = float((dense(a) * dense(b)).sum()) + (3.0 - 2.0)
    assert update_inner(u, v) == pytest.approx(expected, rel=1e-12)
    assert update_norm(u) == pytest.approx(math.sqrt(float((dense(a) ** 2).sum()) + 5.0), rel=1e-12)


def test_clip_hand_computed():
    u = {"a": torch.tensor([3.0, 4.0])}  # norm 5
    clipped, scale = clip_update(u, 1.0)
    assert scale == pytest.approx(0.2)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.8]))
    same, scale = clip_update(u, 10.0)
    assert scale == 1.0 and torch.equal(same["a"], u["a"])
    fac = {"w": (torch.tensor([[2.0]]), torch.tensor([[0.0, 3.0]]))}  # product [[0, 6]], norm 6
    clipped, scale = clip_update(fac, 3.0)
    assert torch.allclose(dense(clipped["w"]), torch.tensor([[0.0, 3.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="max_norm"):
        clip_update(u, 0.0)


def test_pairwise_distances_match_dense():
    ups = [{"w": lowrank(s)} for s in range(4)]
    d = pairwise_sq_distances(ups)
    for i in range(4):
        for j in range(4):
            ref = float(((dense(ups[i]["w"]) - dense(ups[j]["w"])) ** 2).sum())
            assert d[i, j].item() == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_multi_krum_drops_the_outliers():
    honest = [{"w": torch.full((3,), 1.0) + 0.01 * i} for i in range(6)]
    bad = [{"w": torch.full((3,), -50.0)}, {"w": torch.full((3,), 80.0)}]
    chosen = multi_krum_select(honest + bad, num_byzantine=2)
    assert chosen == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="n - f - 2"):
        multi_krum_select(honest[:3], num_byzantine=1)


def test_median_and_trimmed_mean_hand_computed():
    ups = [{"w": torch.tensor([1.0, 10.0])}, {"w": torch.tensor([2.0, -100.0])}, {"w": torch.tensor([100.0, 0.0])},
           {"w": torch.tensor([3.0, 1.0])}]
    med = coordinate_median(ups)["w"]
    assert torch.allclose(med, torch.tensor([2.5, 0.5]))
    tm = trimmed_mean(ups, trim=1)["w"]
    assert torch.allclose(tm, torch.tensor([2.5, 0.5]))
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(ups, trim=2)


def test_weighted_mean_of_lowrank_equals_mean_of_products():
    a, b = lowrank(3), lowrank(4)
    out = weighted_mean([{"w": a}, {"w": b}], [1.0, 3.0])["w"]
    ref = (dense(a) * 0.25 + dense(b) * 0.75).float()
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_robust_importance_resists_an_inflating_liar():
    honest = [torch.tensor([[0.9, 0.1, 0.1, 0.1]]) + 0.01 * i for i in range(4)]
    liar = torch.tensor([[0.0, 0.0, 0.0, 1e6]])
    combined = robust_importance(honest + [liar], "median")
    assert combined.argmax().item() == 0
    # without the re-normalisation and median a plain mean would be taken over
    assert torch.stack(honest + [liar]).mean(0).argmax().item() == 3
    with pytest.raises(ValueError, match="unknown importance method"):
        robust_importance(honest, "mode")


def test_streaming_norm_is_the_norm_of_the_summed_products():
    """With the default defence the norm deciding a refusal is measured by the exact sum's
    own pass over the float32 products: the factor-form norm up to float32 rounding of the
    products, and the same whatever order the updates arrive in."""
    from fedmla.coordinator.defenses import DefenseConfig, RobustAggregator, _factor_form
    from fedmla.coordinator.robust import update_norm
    from fedmla.mla_model import MLAConfig
    from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec
    from fedmla.worker.trainer import init_global_state
    model = MLAConfig.preset("tiny")
    cfg = CodecConfig(rank=3, keep_ratio=0.5)
    state = init_global_state(model, 0)
    server = ServerCodec(model, cfg, state)
    server.importance = torch.rand(model.n_layers, model.n_heads, generator=torch.Generator().manual_seed(1)).double()
    plan = server.plan()
    g = torch.Generator().manual_seed(2)
    msgs = {}
    for i, scale in enumerate((1e-3, 1e-1, 3.0)):
        local = {n: t + torch.randn(t.shape, generator=g) * scale for n, t in state.items()}
        msgs[f"c{i}"] = ClientCodec(model, cfg, server.shapes, f"c{i}").encode(state, local, plan, None, 5 + i)
    norms = []
    for order in (["c0", "c1", "c2"], ["c2", "c0", "c1"]):
        agg = RobustAggregator(server.shapes, model.n_layers, model.n_heads, DefenseConfig())
        agg.begin_round(None, plan)
        for c in order:
            agg.add(c, server.decode(msgs[c], plan))
        norms.append(dict(agg.norms))
        for c in order:
            u = server.decode(msgs[c], plan)
            factor = update_norm({k: _factor_form(p) for k, p in u.tensors.parts.items()})
            assert agg.norms[c] == pytest.approx(factor, rel=1e-5)
    assert norms[0] == norms[1]

