"""Worker encode -> coordinator decode/aggregate -> downlink, on the tiny MLA shapes."""

import pytest
import torch

from fedmla.protos.weights import model_hash
from fedmla.protos.codec import (ClientCodec, CodecConfig, ExactAggregator, RoundPlan, ServerCodec, SharedState,
                               UpdateDecodeError, apply_downlink)
from fedmla.protos.codec.wire import TensorCodec
from fedmla.mla_model import MLAConfig
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.worker.trainer import init_global_state

MODEL = MLAConfig.preset("tiny")


@pytest.fixture(scope="module")
def global_state():
    return init_global_state(MODEL, 0)


def shapes_of(state):
    return {n: tuple(t.shape) for n, t in state.items()}


def perturbed(state, seed, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in state.items()}


@pytest.mark.parametrize("method", ["svd", "powersgd", "topk"])
def test_aggregate_equals_weighted_sum_of_reconstructions(global_state, method):
    cfg = CodecConfig(method=method, rank=3, head_selection=True, keep_ratio=0.5, powersgd_warmup_rounds=0)
    server = ServerCodec(MODEL, cfg, global_state)
    server.importance = torch.rand(MODEL.n_layers, MODEL.n_heads, generator=torch.Generator().manual_seed(1)).double()
    plan = server.plan()
    assert not plan.mask.all()
    counts = {"a": 10, "b": 30, "c": 7}
    agg = server.aggregator(plan)
    expected = {n: torch.zeros(s, dtype=torch.float64) for n, s in server.shapes.items()}
    for i, (cid, n) in enumerate(counts.items()):
        client = ClientCodec(MODEL, cfg, server.shapes, cid)
        msg = client.encode(global_state, perturbed(global_state, i), plan, None, n)
        decoded = server.decode(pb.ModelUpdate.FromString(msg.SerializeToString()), plan)
        agg.add(cid, decoded)
        for name, part in decoded.tensors.parts.items():
            # each client's reconstruction, independently recomputed from its own factors
            if part.value is not None:
                recon = part.sel.scatter(part.value, server.shapes[name])
            elif part.side is None:
                recon = part.sel.scatter(part.left.t() @ part.right, server.shapes[name])
            elif part.side == "left":
                recon = part.sel.scatter(part.basis @ part.right, server.shapes[name])
            else:
                recon = part.sel.scatter(part.left.t() @ part.basis.t(), server.shapes[name])
            expected[name] += recon.double() * n
    got = agg.finish()
    total = sum(counts.values())
    for name in expected:
        want = expected[name] / total
        err = (got[name].double() - want).norm() / want.norm().clamp_min(1e-30)
        assert err <= 1e-6, name


def test_aggregation_hand_computed_and_not_mean_of_factors():
    # Two rank-1 updates of a 2x2 matrix, weights 1 and 3.
    from fedmla.protos.codec.layout import Selection
    from fedmla.protos.codec.server import DecodedUpdate
    from fedmla.protos.codec.wire import DecodedTensors, Part

    def upd(left, right, n):
        return DecodedUpdate(DecodedTensors({"w": Part(sel=Selection(), left=torch.tensor([left]),
                                                      right=torch.tensor([right]))}), None, n, {})

    agg = ExactAggregator({"w": (2, 2)}, 1, 1)
    agg.begin_round(None, RoundPlan(0, torch.ones(1, 1, dtype=torch.bool), SharedState(0)))
    agg.add("x", upd([1.0, 0.0], [1.0, 2.0], 1))
    agg.add("y", upd([0.0, 1.0], [3.0, 4.0], 3))
    got = agg.finish()["w"]
    assert torch.allclose(got, torch.tensor([[1.0, 2.0], [9.0, 12.0]]) / 4)
    mean_left = (torch.tensor([1.0, 0.0]) * 1 + torch.tensor([0.0, 1.0]) * 3) / 4
    mean_right = (torch.tensor([1.0, 2.0]) * 1 + torch.tensor([3.0, 4.0]) * 3) / 4
    assert not torch.allclose(got, torch.outer(mean_left, mean_right))


def test_aggregation_is_bit_identical_in_any_arrival_order(global_state):
    cfg = CodecConfig(method="svd", rank=2)
    server = ServerCodec(MODEL, cfg, global_state)
    plan = server.plan()
    msgs = {}
    for i, cid in enumerate(["c0", "c1", "c2", "c3"]):
        msgs[cid] = ClientCodec(MODEL, cfg, server.shapes, cid).encode(global_state, perturbed(global_state, i, 0.1),
                                                                       plan, None, 5 + i)
    results = []
    for order in (["c0", "c1", "c2", "c3"], ["c3", "c1", "c0", "c2"]):
        agg = server.aggregator(plan)
        for cid in order:
            agg.add(cid, server.decode(msgs[cid], plan))
        results.append(model_hash(agg.finish()))
    assert results[0] == results[1]


@pytest.mark.parametrize("method", ["svd", "powersgd", "dense", "topk"])
def test_error_feedback_preserves_the_sum(global_state, method):
    cfg = CodecConfig(method=method, rank=1, factor_bits=4, keep_ratio=0.25, explore_heads=0, powersgd_warmup_rounds=0)
    server = ServerCodec(MODEL, cfg, global_state)
    server.importance = torch.tensor([[0.1, 0.9, 0.2, 0.3], [0.5, 0.1, 0.2, 0.3]], dtype=torch.float64)
    plan = server.plan()
    assert plan.mask.tolist() == [[False, True, False, False], [True, False, False, False]]
    client = ClientCodec(MODEL, cfg, server.shapes, "a")
    old = {n: 1e-3 * torch.ones(s) for n, s in server.shapes.items()}
    client.load_state_dict(old)
    local = perturbed(global_state, 3)
    msg = client.encode(global_state, local, plan, None, 4)
    decoded = server.decode(msg, plan)
    for name, shape in server.shapes.items():
        delta = local[name] - global_state[name] + cfg.residual_decay * old[name]   # decay: 0.7 by default
        part = decoded.tensors.parts.get(name)
        sent = part.dense(shape) if part is not None else torch.zeros(shape)
        assert torch.allclose(sent + client.residual[name], delta, atol=1e-6), name
    # wo of layer 0: only head 1's columns may be non-zero in what was sent; the rest is all residual
    name = "layers.0.attn.wo.weight"
    sent = decoded.tensors.parts[name].dense(server.shapes[name])
    dv = MODEL.v_head_dim
    assert torch.count_nonzero(sent[:, :dv]) == 0 and torch.count_nonzero(sent[:, 2 * dv:]) == 0
    delta = local[name] - global_state[name] + cfg.residual_decay * old[name]
    assert torch.allclose(client.residual[name][:, :dv], delta[:, :dv])


def test_quantised_factor_error_is_bounded(global_state):
    cfg = CodecConfig(method="svd", rank=2, factor_bits=8, head_selection=False)
    cfg32 = cfg.model_copy(update={"factor_bits": 0, "dense_bits": 0})
    server = ServerCodec(MODEL, cfg, global_state)
    plan = server.plan()
    local = perturbed(global_state, 5)
    d8 = server.decode(ClientCodec(MODEL, cfg, server.shapes, "a").encode(global_state, local, plan, None, 1), plan)
    s32 = ServerCodec(MODEL, cfg32, global_state)
    d32 = s32.decode(ClientCodec(MODEL, cfg32, server.shapes, "a").encode(global_state, local, plan, None, 1), plan)
    name = "layers.1.ffn.w1.weight"
    p8, p32 = d8.tensors.parts[name], d32.tensors.parts[name]
    for a, b in ((p8.left, p32.left), (p8.right, p32.right)):
        scale = b.abs().amax(dim=1) / 127
        assert ((a - b).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("extra", [{}, {"replicate_momentum": True, "factor_bits": 3, "downlink_bits": 3,
                                         "entropy_coding": True, "half_scales": True, "fit_scales": True}])
def test_coordinator_and_worker_hashes_match_after_rounds(global_state, extra):
    from fedmla.worker.data import ClientData
    from fedmla.worker.trainer import LocalTrainer, TrainerConfig

    # round 0 is a powersgd warm-up (svd) round, rounds 1-2 use the shared bases
    cfg = CodecConfig(method="powersgd", rank=2, keep_ratio=0.5, dense_every=2, powersgd_warmup_rounds=1, **extra)
    tc = TrainerConfig(local_steps=2, batch_size=2, seq_len=16, warmup_steps=0, total_steps=10)
    trainer = LocalTrainer(MODEL, tc)
    g = torch.Generator().manual_seed(0)
    data = [ClientData(f"c{i}", torch.randint(0, 256, (400,), generator=g, dtype=torch.uint8),
                       torch.empty(0, dtype=torch.uint8)) for i in range(2)]
    server = ServerCodec(MODEL, cfg, global_state)
    shapes = server.shapes
    clients = [ClientCodec(MODEL, cfg, shapes, c.name) for c in data]
    w_state, w_shared, w_codec = dict(global_state), server.shared, TensorCodec(MODEL, cfg, shapes)
    for r in range(3):
        plan = server.plan()
        agg = server.aggregator(plan)
        for c, codec in zip(data, clients):
            res = trainer.train(w_state, c, round_idx=r)
            agg.add(c.name, server.decode(codec.encode(w_state, res.state, plan, res.importance, res.num_examples), plan))
        down = server.finish_round(plan, agg.finish(), agg.importance())
        w_state, w_shared = apply_downlink(w_state, w_shared, pb.ModelUpdate.FromString(down.SerializeToString()),
                                           w_codec)
        assert model_hash(w_state) == server.global_hash()
        assert w_shared.digest() == server.shared.digest()
    assert model_hash(w_state) != model_hash(global_state)
    assert server.importance is not None and not server.plan().mask.all()


def test_decode_rejects_bad_updates(global_state):
    cfg = CodecConfig(method="powersgd", rank=2, keep_ratio=0.5, powersgd_warmup_rounds=0)
    server = ServerCodec(MODEL, cfg, global_state)
    server.importance = torch.rand(2, 4, generator=torch.Generator().manual_seed(0)).double()
    plan = server.plan()
    good = ClientCodec(MODEL, cfg, server.shapes, "a").encode(global_state, perturbed(global_state, 1), plan,
                                                              torch.rand(2, 4), 8)
    server.decode(good, plan)

    def broken(fn):
        m = pb.ModelUpdate()
        m.CopyFrom(good)
        fn(m)
        return m

    cases = [
        (lambda m: setattr(m.factors[0], "name", "nope.weight"), "unknown parameter 'nope.weight'"),
        (lambda m: setattr(m.factors[0], "rank", 5), "rank 5, expected 2"),
        (lambda m: m.factors.append(m.factors[0]), "sent twice"),
        (lambda m: m.factors[[f.name for f in m.factors].index("layers.0.attn.wo.weight")].heads.heads.append(3)
         if 3 not in m.factors[[f.name for f in m.factors].index("layers.0.attn.wo.weight")].heads.heads
         else m.factors[[f.name for f in m.factors].index("layers.0.attn.wo.weight")].heads.heads.pop(),
         "layers.0.attn.wo.weight: covers heads"),
        (lambda m: setattr(m.dense[0].value, "data", m.dense[0].value.data[:-1]), "data bytes"),
        (lambda m: setattr(m, "num_examples", 0), "num_examples"),
        (lambda m: m.importance.scores.pop(), "importance has 7 scores"),
        (lambda m: m.importance.scores.__setitem__(0, float("nan")), "finite"),
    ]
    for fn, msg in cases:
        with pytest.raises(UpdateDecodeError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            server.decode(broken(fn), plan)
    # a non-finite factor value travels as a non-finite scale
    m = pb.ModelUpdate()
    m.CopyFrom(good)
    f = next(f for f in m.factors if f.HasField("left"))
    half = f.left.quant.scales.dtype == pb.FLOAT16                     # float16 scales by default
    f.left.quant.scales.data = torch.full((f.rank,), float("inf"),
                                          dtype=torch.float16 if half else torch.float32).numpy().tobytes()
    with pytest.raises(UpdateDecodeError, match=f"{f.name}.left: non-finite"):
        server.decode(m, plan)


def test_stale_round_is_rejected(global_state):
    cfg = CodecConfig(rank=1)
    server = ServerCodec(MODEL, cfg, global_state)
    plan = server.plan()
    agg = server.aggregator(plan)
    msg = ClientCodec(MODEL, cfg, server.shapes, "a").encode(global_state, perturbed(global_state, 1), plan, None, 1)
    agg.add("a", server.decode(msg, plan))
    with pytest.raises(ValueError, match="already contributed"):
        agg.add("a", server.decode(msg, plan))
    server.finish_round(plan, agg.finish(), None)
    with pytest.raises(UpdateDecodeError, match="round 0"):
        server.decode(msg, plan)


@pytest.mark.parametrize("replicate", [False, True])
def test_server_checkpoint_resumes_bit_identically(global_state, replicate):
    cfg = CodecConfig(rank=2, outer="nesterov", dense_every=2, replicate_momentum=replicate, factor_bits=3,
                      entropy_coding=True, half_scales=True)
    shapes = shapes_of(global_state)

    def one_round(server, seed):
        plan = server.plan()
        agg = server.aggregator(plan)
        for i, cid in enumerate(["a", "b"]):
            msg = ClientCodec(MODEL, cfg, shapes, cid).encode(server.global_state,
                                                             perturbed(server.global_state, seed + i), plan,
                                                             torch.rand(2, 4, generator=torch.Generator().manual_seed(i)),
                                                             3 + i)
            agg.add(cid, server.decode(msg, plan))
        return server.finish_round(plan, agg.finish(), agg.importance())

    a = ServerCodec(MODEL, cfg, global_state)
    one_round(a, 0)
    saved = a.state_dict()
    b = ServerCodec(MODEL, cfg, init_global_state(MODEL, 1))
    b.load_state_dict(saved)
    assert b.global_hash() == a.global_hash() and b.shared.digest() == a.shared.digest()
    da, db = one_round(a, 10), one_round(b, 10)
    assert da.SerializeToString() == db.SerializeToString()
    assert a.global_hash() == b.global_hash()
    assert torch.equal(a.plan().mask, b.plan().mask)


def test_outer_step_hand_computed():
    from fedmla.protos.codec.server import outer_step
    cfg = CodecConfig(outer="nesterov", outer_lr=2.0, outer_momentum=0.5)
    step, m = outer_step(cfg, {"w": torch.tensor([1.0, -2.0])}, {})
    assert m["w"].tolist() == [1.0, -2.0] and step["w"].tolist() == [3.0, -6.0]       # 2 * (d + 0.5 * d)
    step, m = outer_step(cfg, {"w": torch.tensor([2.0, 0.0])}, m)
    assert m["w"].tolist() == [2.5, -1.0] and step["w"].tolist() == [6.5, -1.0]       # 2 * (d + 0.5 * (0.5 m + d))
    step, m = outer_step(CodecConfig(outer="fedavg", outer_lr=0.5), {"w": torch.tensor([4.0])}, {})
    assert step["w"].tolist() == [2.0] and m == {}


def test_replicated_momentum_downlink_carries_the_aggregate_not_the_step(global_state):
    # Exact codec (no low-rank step, fp32): the downlink must decode to the weighted mean
    # delta itself, and every party must move by the Nesterov step of it.
    cfg = CodecConfig(method="dense", head_selection=False, factor_bits=0, dense_bits=0, downlink_bits=0,
                      outer="nesterov", outer_lr=1.0, outer_momentum=0.5, replicate_momentum=True)
    shapes = shapes_of(global_state)
    server = ServerCodec(MODEL, cfg, global_state)
    tensors = TensorCodec(MODEL, cfg, shapes)
    w_state, w_shared = dict(global_state), server.shared
    name = "layers.0.attn.wkv_b.weight"
    momentum = None
    for r in range(2):
        before = server.global_state[name].clone()
        plan = server.plan()
        agg = server.aggregator(plan)
        deltas = []
        for i, n in enumerate((1, 3)):
            local = perturbed(server.global_state, 10 * r + i)
            deltas.append((local[name] - server.global_state[name], n))
            msg = ClientCodec(MODEL, cfg, shapes, f"c{i}").encode(server.global_state, local, plan, None, n)
            agg.add(f"c{i}", server.decode(msg, plan))
        down = server.finish_round(plan, agg.finish(), None)
        mean = (deltas[0][0] * 1 + deltas[1][0] * 3) / 4
        sent = tensors.decode(down.factors, down.dense, plan, uplink=False).parts[name].dense(shapes[name])
        assert torch.allclose(sent, mean, atol=1e-6)
        momentum = mean.clone() if momentum is None else 0.5 * momentum + mean
        assert torch.allclose(server.global_state[name] - before, mean + 0.5 * momentum, atol=1e-5)
        w_state, w_shared = apply_downlink(w_state, w_shared, pb.ModelUpdate.FromString(down.SerializeToString()),
                                           tensors)
        assert model_hash(w_state) == server.global_hash() and w_shared.digest() == server.shared.digest()
        assert torch.allclose(w_shared.momentum[name], momentum, atol=1e-6)


def test_codes_beyond_the_configured_range_are_refused(global_state):
    cfg = CodecConfig(rank=2, factor_bits=3, head_selection=False)
    shapes = shapes_of(global_state)
    server = ServerCodec(MODEL, cfg, global_state)
    plan = server.plan()
    msg = ClientCodec(MODEL, cfg, shapes, "a").encode(global_state, perturbed(global_state, 0), plan, None, 5)
    from fedmla.protos.tensors import decode_int_rows, encode_int_rows
    f = msg.factors[0]
    q, s, _ = decode_int_rows(f.left)
    q[0, 0] = 7                                                         # valid int4, not a 3-bit code
    f.left.CopyFrom(encode_int_rows(q, s, 4))
    with pytest.raises(UpdateDecodeError, match=r"beyond \+-3"):
        server.decode(msg, plan)


def test_int8_code_minus_128_is_refused(global_state):
    # -128 fits an int8 but not the symmetric 8-bit range; abs() of it is still -128.
    cfg = CodecConfig(rank=2, factor_bits=8, head_selection=False)
    shapes = shapes_of(global_state)
    server = ServerCodec(MODEL, cfg, global_state)
    plan = server.plan()
    msg = ClientCodec(MODEL, cfg, shapes, "a").encode(global_state, perturbed(global_state, 0), plan, None, 5)
    from fedmla.protos.tensors import decode_int_rows, encode_int_rows
    f = msg.factors[0]
    q, s, _ = decode_int_rows(f.left)
    q[0, 0] = -128
    f.left.CopyFrom(encode_int_rows(q, s, 8))
    with pytest.raises(UpdateDecodeError, match=r"beyond \+-127"):
        server.decode(msg, plan)


def test_fedavg_preset_is_the_weighted_mean_of_local_models():
    """FedAvg is a configuration of the codec: fp32 dense both ways, all heads, outer lr 1."""
    from fedmla.mla_model import MLAConfig
    from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec
    from fedmla.protos.fedmla.v1 import types_pb2 as pb
    cfg = MLAConfig.preset("tiny")
    gen = torch.Generator().manual_seed(0)
    init = {n: torch.randn(s, generator=gen) for n, s in __import__("fedmla.mla_model", fromlist=["x"]).parameter_shapes(cfg).items()}
    shapes = {n: tuple(t.shape) for n, t in init.items()}
    for codec_cfg, factor in [(CodecConfig.fedavg(), 1.0), (CodecConfig.diloco(), 1.5)]:
        assert codec_cfg.uncompressed
        server = ServerCodec(cfg, codec_cfg, init)
        plan = server.plan()
        assert bool(plan.mask.all())
        agg = server.aggregator(plan)
        locals_, weights = [], [10, 20, 30]
        for i, w in enumerate(weights):
            loc = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in init.items()}
            locals_.append(loc)
            msg = ClientCodec(cfg, codec_cfg, shapes, f"c{i}").encode(init, loc, plan, None, w, {})
            agg.add(f"c{i}", server.decode(pb.ModelUpdate.FromString(msg.SerializeToString()), plan))
        server.finish_round(plan, agg.finish(), agg.importance())
        for n in init:
            mean_delta = sum((l[n].double() - init[n].double()) * w for l, w in zip(locals_, weights)) / sum(weights)
            # DiLoCo's first outer Nesterov step (momentum 0.5 from zero) moves 1.5x the mean delta.
            torch.testing.assert_close(server.global_state[n].double(), init[n].double() + factor * mean_delta,
                                       rtol=0, atol=1e-6)


def test_exact_aggregate_is_the_same_bits_in_any_arrival_order_and_from_threads():
    """The aggregate of a round does not depend on the order (or the threads) its updates
    arrive in, an update taken out leaves exactly the sum of the others, and it equals the
    exactly rounded weighted mean of what was sent to within the grid."""
    import itertools
    import threading

    from fedmla.mla_model import MLAConfig, parameter_shapes
    from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec
    from fedmla.protos.fedmla.v1 import types_pb2 as pb
    cfg = MLAConfig.preset("tiny")
    codec_cfg = CodecConfig(rank=4)
    gen = torch.Generator().manual_seed(7)
    shapes = parameter_shapes(cfg)
    init = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    server = ServerCodec(cfg, codec_cfg, init)
    plan = server.plan()
    decoded, weights = {}, {}
    for i in range(5):
        scale = 10.0 ** (i - 3)     # updates of very different sizes make float sums order-sensitive
        loc = {n: t + scale * torch.randn(t.shape, generator=gen) for n, t in init.items()}
        msg = ClientCodec(cfg, codec_cfg, {n: tuple(s) for n, s in shapes.items()}, f"c{i}").encode(
            init, loc, plan, torch.rand(2, 4, generator=gen), 7 + 13 * i, {})
        decoded[f"c{i}"] = server.decode(pb.ModelUpdate.FromString(msg.SerializeToString()), plan)
        weights[f"c{i}"] = 7 + 13 * i

    def aggregate(order, threads=False, drop=None):
        agg = server.aggregator(plan)
        if threads:
            ts = [threading.Thread(target=agg.add, args=(c, decoded[c], weights[c])) for c in order]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        else:
            for c in order:
                agg.add(c, decoded[c], weights[c])
        if drop:
            agg.remove(drop, decoded[drop])
        return agg.finish(), agg.importance()

    ref, ref_imp = aggregate(sorted(decoded))
    for order in itertools.islice(itertools.permutations(sorted(decoded)), 1, 120, 17):
        out, imp = aggregate(order)
        assert all(torch.equal(out[n], ref[n]) for n in ref), order
        assert torch.equal(imp, ref_imp)
    out, _ = aggregate(list(reversed(sorted(decoded))), threads=True)
    assert all(torch.equal(out[n], ref[n]) for n in ref)
    # taking an update out is exact: the same bits as never adding it
    without, _ = aggregate(["c0", "c1", "c3", "c4"])
    removed, _ = aggregate(sorted(decoded), drop="c2")
    assert all(torch.equal(without[n], removed[n]) for n in ref)
    # and the sum is the weighted mean of what was sent (float64 reference, to the grid)
    total = sum(weights.values())
    for n, shape in shapes.items():
        expect = sum(decoded[c].tensors.parts[n].dense(tuple(shape)).double() * weights[c] for c in decoded) / total
        assert (ref[n].double() - expect).abs().max() <= 1e-6 * expect.abs().max() + 1e-9, n


def test_exact_sum_grid_refusals_and_take_out():
    """ExactSum by hand: values on the 2**-40 grid come back exactly, sub-grid bits are
    truncated toward zero, a term can be taken out exactly, and NaN, inf or a value past
    2**32 is refused (NaN once slipped through an int64 conversion)."""
    from fedmla.protos.codec.exact import ExactSum
    s = ExactSum({"w": (4,)})
    grid = 2.0 ** -40
    a = torch.tensor([1.5, -3 * grid, 2.0 ** 31, 0.0], dtype=torch.float64)
    b = torch.tensor([0.25, grid / 2, -(2.0 ** 31), -grid * 1.75], dtype=torch.float64)
    s.add("w", a)
    s.add("w", b)
    assert s.value("w").tolist() == [1.75, -3 * grid, 0.0, -grid]   # grid/2 -> 0, -1.75 grid -> -1 grid
    s.add("w", b, sign=-1)
    assert torch.equal(s.value("w"), a)
    for bad in (float("nan"), float("inf"), 2.0 ** 32):
        with pytest.raises(OverflowError):
            s.add("w", torch.tensor([0.0, bad, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(s.value("w"), a)      # a refused term left nothing behind


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 3.0, 1e6])
def test_exact_sum_add_scaled_gives_the_reference_limbs(scale, monkeypatch):
    """ExactSum.add_scaled (float32 x integer weight, high limbs only when needed) leaves the
    same integer sum (limbs in one split) and value as add() of the float64 term, for
    terms below 1 (low limbs only), of many grid sizes, signs, subnormals and zeros, over
    several chunks, and takes a term out exactly."""
    from fedmla.protos.codec import exact
    from fedmla.protos.codec.exact import ExactSum
    g = torch.Generator().manual_seed(int(scale * 1e6) % 1000)
    monkeypatch.setattr(exact, "_CHUNK", 4096)     # small chunks: the same code over several of them
    n = 3 * exact._CHUNK + 17                     # several chunks and a short last one
    shapes = {"w": (n,)}
    ref, fast = ExactSum(shapes), ExactSum(shapes)
    for weight in (1, 7, 100, 1_000_000):
        x = (torch.randn(n, generator=g) * scale * torch.rand(n, generator=g) ** 8).float()
        x[:5] = torch.tensor([0.0, -0.0, 1e-45, -3e-39, 2.0 ** -41])
        x = x.clamp(-(2.0 ** 31) / weight, (2.0 ** 31) / weight)
        ref.add("w", x.double() * weight)
        fast.add_scaled("w", x, weight)
        assert all(torch.equal(a, b) for a, b in zip(ref.sum_limbs("w"), fast.sum_limbs("w")))
        assert torch.equal(ref.value("w"), fast.value("w"))
    fast.add_scaled("w", x, weight, sign=-1)
    ref.add("w", x.double() * weight, sign=-1)
    assert torch.equal(ref.value("w"), fast.value("w"))
    before = fast.value("w")
    for bad in (float("nan"), float("inf"), 2.0 ** 32 / 3):
        y = x.clone()
        y[n // 2] = bad
        with pytest.raises(OverflowError):
            fast.add_scaled("w", y, 3)
    assert torch.equal(fast.value("w"), before)      # a refused term left nothing behind


def _peaky(m, n, r, spike, seed):
    """(m, n) = U diag(s) V^T whose singular vectors each hold one large coordinate (as the
    embedding rows of frequent tokens do in a pseudo-gradient)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(m, r, generator=g, dtype=torch.float64)
    v = torch.randn(n, r, generator=g, dtype=torch.float64)
    u[torch.arange(r), torch.arange(r)] += spike * m ** 0.5
    v[torch.arange(r) + r, torch.arange(r)] += spike * n ** 0.5
    u, v = torch.linalg.qr(u)[0], torch.linalg.qr(v)[0]
    s = torch.linspace(2.0, 1.0, r, dtype=torch.float64)
    return ((u * s) @ v.t()).float()


def test_rotated_factors_keep_the_product_and_quantise_better():
    from fedmla.protos.codec.lowrank import random_rotation, randomized_svd
    from fedmla.protos.codec.quant import dequantize_rows, quantize_rows

    q = random_rotation(12, torch.Generator().manual_seed(0))
    assert torch.allclose(q.t() @ q, torch.eye(12, dtype=torch.float64), atol=1e-12)
    x = _peaky(200, 300, 12, spike=0.5, seed=1)

    def factors(rotate):
        return randomized_svd(x, 12, 8, 2, torch.Generator().manual_seed(3), rotate=rotate)

    (pl, pr), (rl, rr) = factors(False), factors(True)
    assert torch.allclose(pl.t() @ pr, rl.t() @ rr, atol=1e-5)        # the same product ...
    assert (pl - rl).abs().max() > 0.01                                # ... from other factors
    # a rotated row mixes every singular component: none of them is left on its own row
    cos = (torch.nn.functional.normalize(rl.double(), dim=1) @ torch.nn.functional.normalize(pl.double(), dim=1).t())
    assert cos.abs().max() < 0.95
    # per-row 3-bit quantisation of both factors: the rotated factors reconstruct x more closely
    def err(left, right):
        ql, sl = quantize_rows(left, 3)
        qr, sr = quantize_rows(right, 3)
        return float((dequantize_rows(ql, sl, 3).t() @ dequantize_rows(qr, sr, 3) - x).norm() / x.norm())
    assert err(rl, rr) < 0.8 * err(pl, pr)


def test_rotate_factors_is_the_default_and_changes_what_is_sent(global_state):
    assert CodecConfig().rotate_factors is True
    with pytest.raises(ValueError, match="rotate_factors"):
        CodecConfig(rotate_factors="sometimes")
    local = perturbed(global_state, 0)
    msgs = {}
    for rotate in (False, True):
        cfg = CodecConfig(rotate_factors=rotate)
        server = ServerCodec(MODEL, cfg, global_state)
        plan = server.plan()
        client = ClientCodec(MODEL, cfg, server.shapes, "a")
        msg = client.encode(global_state, local, plan, None, 5)
        decoded = server.decode(pb.ModelUpdate.FromString(msg.SerializeToString()), plan)
        msgs[rotate] = (msg, decoded, client.residual)
    (m0, d0, _), (m1, d1, r1) = msgs[False], msgs[True]
    assert m0.factors[0].left.data != m1.factors[0].left.data
    for name, part in d1.tensors.parts.items():         # still a rank-r update with exact error feedback
        if part.left is not None:
            assert part.left.shape == d0.tensors.parts[name].left.shape
            recon = part.dense(global_state[name].shape)
            delta = local[name] - global_state[name]
            assert torch.allclose(recon + r1[name], delta, atol=1e-6)


@pytest.mark.parametrize("beta", [None, 0.0, 1.0])
def test_server_residual_is_decayed_then_resent(global_state, beta):
    """finish_round: what the downlink left out of a round's step comes back the next round
    times server_residual_decay (0.85 by default); the downlink plus the new residual is
    exactly that input."""
    from fedmla.protos.codec.server import _downlink_plan

    cfg = CodecConfig() if beta is None else CodecConfig(server_residual_decay=beta)
    assert CodecConfig().server_residual_decay == 0.85
    server = ServerCodec(MODEL, cfg, global_state)
    agg = perturbed({n: torch.zeros_like(t) for n, t in global_state.items()}, 3)
    server.finish_round(server.plan(), agg, None)
    left_out = {n: t.clone() for n, t in server.residual.items()}
    assert max(float(t.abs().max()) for t in left_out.values()) > 1e-4
    shared = server.shared
    plan = server.plan()
    msg = server.finish_round(plan, {n: torch.zeros_like(t) for n, t in global_state.items()}, None)
    sent = server.tensors.decode(msg.factors, msg.dense, _downlink_plan(shared, plan.send_dense), uplink=False)
    for name, t in left_out.items():
        got = sent.parts[name].dense(server.shapes[name]) if name in sent.parts else torch.zeros_like(t)
        assert torch.allclose(got + server.residual[name], cfg.server_residual_decay * t, atol=1e-6), name


def test_embedding_factors_take_their_own_bit_widths(global_state):
    """embed_factor_bits / embed_downlink_bits: the token embedding's factors (tied LM head)
    travel at their own widths, every other factor at factor_bits / downlink_bits; the
    receiver holds the sender to the configured width and the size bound grows with it."""
    from fedmla.protos.codec.server import _downlink_plan
    from fedmla.protos.tensors import decode_int_rows

    assert CodecConfig().embed_factor_bits is None and CodecConfig().embed_downlink_bits == 4
    with pytest.raises(ValueError, match="embed_downlink_bits"):
        CodecConfig(embed_downlink_bits=5)
    local = perturbed(global_state, 0)
    cfg = CodecConfig(embed_factor_bits=8, embed_downlink_bits=4)
    server = ServerCodec(MODEL, cfg, global_state)
    plan = server.plan()
    msg = ClientCodec(MODEL, cfg, server.shapes, "a").encode(global_state, local, plan, None, 5)
    widths = {f.name: decode_int_rows(f.left)[2] for f in msg.factors}
    assert widths.pop("embed.weight") == 8 and set(widths.values()) == {4}          # 3-bit codes: 4-bit slots
    assert len(msg.SerializeToString()) <= server.max_update_bytes(plan)
    assert server.max_update_bytes(plan) > ServerCodec(MODEL, CodecConfig(), global_state).max_update_bytes(plan)
    agg = server.aggregator(plan)
    agg.add("a", server.decode(pb.ModelUpdate.FromString(msg.SerializeToString()), plan))
    shared = server.shared
    down = server.finish_round(plan, agg.finish(), None)
    codes = {f.name: decode_int_rows(f.left)[0] for f in down.factors}
    assert int(codes["embed.weight"].abs().max()) > 3                                 # 4-bit levels, +-7
    assert all(int(q.abs().max()) <= 3 for n, q in codes.items() if n != "embed.weight")
    server.tensors.decode(down.factors, down.dense, _downlink_plan(shared, True), uplink=False)
    # an update encoded with the default (3-bit) embedding is refused by this run, and the other way round
    plain = ClientCodec(MODEL, CodecConfig(), server.shapes, "b").encode(global_state, local, plan, None, 5)
    fresh = ServerCodec(MODEL, cfg, global_state)
    with pytest.raises(UpdateDecodeError, match="embed.weight.left: 4-bit payload, this run uses 8-bit"):
        fresh.decode(plain, fresh.plan())
    with pytest.raises(UpdateDecodeError, match="embed.weight.left: 8-bit payload, this run uses 3-bit"):
        ServerCodec(MODEL, CodecConfig(), global_state).decode(msg, plan)
