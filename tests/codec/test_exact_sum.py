"""ExactSum.add_scaled (the coordinator's compiled split, and the numpy split used without
numba) against the plain float64 path: the same integer limbs, bit for bit, on both paths
(all |w x| < 1, the high limb, terms past int64's grid), in and across chunk boundaries and
selection runs, added and taken out."""

import pytest
import torch

from fedmla.protos.codec import exact
from fedmla.protos.codec.exact import MAX_TERM_BITS, MAX_WEIGHT, ExactSum


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def kernels(request, monkeypatch):
    """Every test runs on both paths of add_scaled: the numba kernels and the numpy chunks."""
    if request.param == "numpy":
        monkeypatch.setattr(exact, "_kernels", lambda: None)
    elif exact._kernels() is None:
        pytest.skip("numba is not installed")
    return request.param


def test_the_compiled_kernels_are_in_use_when_numba_is_installed(kernels):
    pytest.importorskip("numba")
    assert exact.warm_up() == (kernels == "compiled")


def limbs_of(es, name):
    """(lo, hi or None when all 0) of the sum, in the one split of it with 0 <= lo < 2**40
    (the compiled path and the float64 path split the same sum differently), or (None,
    None) while nothing was added."""
    if name not in es._lo:
        return None, None
    hi, lo = es.sum_limbs(name)
    return lo, hi if hi.any() else None


def terms(g, n):
    """float32 values of every scale: tiny, subnormal, ordinary, near the bound, signed zeros."""
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-60, 8, (n,), generator=g).float())
    x[:: 7] = torch.randn(x[:: 7].shape, generator=g) * 1e-3
    x[1:: 11] = 1.4e-45
    x[2:: 13] = -0.0
    x[3:: 17] = torch.rand(x[3:: 17].shape, generator=g) * (1 - 2 ** -24)      # just below 1
    return x


@pytest.mark.parametrize("chunk", [1, 5, 64, 1 << 17])
def test_add_scaled_gives_the_limbs_of_the_float64_term(chunk, monkeypatch):
    monkeypatch.setattr(exact, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(chunk)
    shapes = {"w": (13, 29), "b": (7,), "e": (0, 3)}
    for weight in (1, 3, 100, 12345, MAX_WEIGHT - 1):
        fast, ref = ExactSum(shapes), ExactSum(shapes)
        for rep in range(3):
            for name, shape in shapes.items():
                x = terms(g, max(1, int(torch.Size(shape).numel()))).reshape(-1)[:torch.Size(shape).numel()].reshape(shape)
                x = x.clamp(-(2.0 ** MAX_TERM_BITS - 1) / weight, (2.0 ** MAX_TERM_BITS - 1) / weight)
                for small in (True, False):
                    y = x / (2 * weight * max(float(x.abs().max()), 1e-30)) if small and x.numel() else x
                    sign = -1 if rep == 2 else 1
                    fast.add_scaled(name, y, weight, sign)
                    ref.add(name, y.double() * weight, sign)
        for name in shapes:
            f_lo, f_hi = limbs_of(fast, name)
            r_lo, r_hi = limbs_of(ref, name)
            assert torch.equal(f_lo, r_lo), (name, weight)
            assert (f_hi is None) == (r_hi is None) and (f_hi is None or torch.equal(f_hi, r_hi)), (name, weight)
            assert torch.equal(fast.value(name), ref.value(name))


def test_low_limbs_fold_into_the_high_ones_when_full(kernels, monkeypatch):
    """The compiled path adds terms whole into the low limbs until these have no room left
    (2**62), then folds them into the high limbs: over many folds, sums past the 2**53 where
    low limbs stop converting exactly to float64, additions and removals, the same sum
    and value as the float64 path's per-term splits."""
    folds = []
    fold = ExactSum._fold
    monkeypatch.setattr(ExactSum, "_fold", lambda self, name: (folds.append(name), fold(self, name)))
    g = torch.Generator().manual_seed(7)
    shape = (5, 9)
    fast, ref = ExactSum({"w": shape}), ExactSum({"w": shape})
    for i in range(60):
        weight = 1000 + 37 * i
        # the largest terms int64's grid takes (just below 2**22), middling ones, small ones
        scale = (2.0 ** 22 - 1) / weight * (1.0, 2.0 ** -9, 2.0 ** -30)[i % 3]
        x = ((torch.rand(shape, generator=g) * 2 - 1) * scale).float()
        x[0, 0] = scale if i % 2 else -scale
        sign = -1 if i % 5 == 4 else 1
        fast.add_scaled("w", x, weight, sign)
        ref.add("w", x.double() * weight, sign)
        f, r = limbs_of(fast, "w"), limbs_of(ref, "w")
        assert torch.equal(f[0], r[0]) and torch.equal(f[1], r[1]), i
        assert torch.equal(fast.value("w"), ref.value("w")), i
    if kernels == "compiled":
        assert len(folds) >= 10
    assert abs(float(ref.value("w").abs().max())) > 2.0 ** 23       # the sum is past what the grid fits in int64


def test_add_scaled_takes_out_exactly_and_refuses_past_the_bound():
    g = torch.Generator().manual_seed(0)
    es = ExactSum({"w": (4, 5)})
    base = torch.randn(4, 5, generator=g)
    es.add_scaled("w", base, 9)
    before = limbs_of(es, "w")
    x = torch.randn(4, 5, generator=g) * 1e3
    es.add_scaled("w", x, 77)
    es.add_scaled("w", x, 77, sign=-1)
    after = limbs_of(es, "w")
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    for bad in (float("nan"), float("inf"), 2.0 ** MAX_TERM_BITS):
        y = base.clone()
        y[1, 2] = bad
        with pytest.raises(OverflowError, match="too large to sum exactly"):
            es.add_scaled("w", y, 1)
    assert all(torch.equal(a, b) for a, b in zip(limbs_of(es, "w"), before))   # nothing of a refused term


def test_add_scaled_of_a_view_and_of_a_tensor_needing_grad():
    es, ref = ExactSum({"w": (3, 4)}), ExactSum({"w": (3, 4)})
    x = torch.randn(4, 3, requires_grad=True)
    es.add_scaled("w", x.t(), 5)                                             # not contiguous, needs grad
    ref.add("w", x.detach().t().double() * 5)
    assert torch.equal(es.value("w"), ref.value("w"))


def _scattered(x, shape, rows, cols):
    out = torch.zeros(shape, dtype=x.dtype)
    return out.index_copy_(0, rows, x) if rows is not None else out.index_copy_(1, cols, x)


@pytest.mark.parametrize("chunk", [3, 7, 64, 1 << 17])
def test_add_scaled_of_a_selection_gives_the_limbs_of_the_full_term(chunk, monkeypatch):
    # a head owns consecutive rows/columns: runs of indices, at the ends and in the middle
    monkeypatch.setattr(exact, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(chunk)
    shape = (12, 10)
    selections = [torch.tensor([0, 1, 2, 6, 7, 8]), torch.tensor([3, 4, 5, 9]), torch.tensor([1]),
                  torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), torch.tensor([], dtype=torch.long)]
    for weight in (1, 100, 12345, MAX_WEIGHT - 1):
        fast, ref = ExactSum({"w": shape}), ExactSum({"w": shape})
        for idx in selections:
            for axis in (0, 1):
                sub_shape = (idx.numel(), shape[1]) if axis == 0 else (shape[0], idx.numel())
                x = terms(g, max(1, sub_shape[0] * sub_shape[1]))[:sub_shape[0] * sub_shape[1]].reshape(sub_shape)
                x = x.clamp(-(2.0 ** MAX_TERM_BITS - 1) / weight, (2.0 ** MAX_TERM_BITS - 1) / weight)
                rows, cols = (idx, None) if axis == 0 else (None, idx)
                fast.add_scaled("w", x, weight, rows=rows, cols=cols)
                ref.add_scaled("w", _scattered(x, shape, rows, cols), weight)
                f, r = limbs_of(fast, "w"), limbs_of(ref, "w")
                assert torch.equal(f[0], r[0]) and (f[1] is None) == (r[1] is None), (idx, axis, weight)
                assert f[1] is None or torch.equal(f[1], r[1])
        # taken out again
        for idx in selections[:2]:
            x = torch.randn(idx.numel(), shape[1], generator=g)
            fast.add_scaled("w", x, weight, rows=idx)
            fast.add_scaled("w", x, weight, sign=-1, rows=idx)
        assert torch.equal(fast.value("w"), ref.value("w"))
    with pytest.raises(ValueError, match="selection"):
        fast.add_scaled("w", torch.zeros(2, 10), 1, rows=torch.tensor([0, 1, 2]))
    with pytest.raises(OverflowError):
        fast.add_scaled("w", torch.full((1, 10), float("nan")), 1, rows=torch.tensor([4]))


@pytest.mark.parametrize("method", ["svd", "powersgd", "dense"])
def test_aggregator_sums_head_selected_updates_as_their_full_shape_terms(method):
    from fedmla.mla_model import MLAConfig
    from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec
    from fedmla.worker.trainer import init_global_state
    model = MLAConfig.preset("tiny")
    cfg = CodecConfig(method=method, rank=3, keep_ratio=0.25, powersgd_warmup_rounds=0)
    state = init_global_state(model, 0)
    server = ServerCodec(model, cfg, state)
    server.importance = torch.rand(model.n_layers, model.n_heads, generator=torch.Generator().manual_seed(3)).double()
    plan = server.plan()
    assert not plan.mask.all()
    agg, ref = server.aggregator(plan), ExactSum(server.shapes)
    g = torch.Generator().manual_seed(4)
    selected = 0
    for i, scale in enumerate((1e-3, 1e-1, 3.0)):
        local = {n: t + torch.randn(t.shape, generator=g) * scale for n, t in state.items()}
        u = server.decode(ClientCodec(model, cfg, server.shapes, f"c{i}").encode(state, local, plan, None, 7 + i), plan)
        for name, part in u.tensors.parts.items():
            ref.add_scaled(name, part.dense(server.shapes[name]), u.num_examples)
            selected += part.sel.rows is not None or part.sel.cols is not None
        agg.add(f"c{i}", u)
    assert selected
    for name in server.shapes:
        assert torch.equal(agg._sum.value(name), ref.value(name)), name
        assert all(torch.equal(a, b) for a, b in zip(agg._sum.sum_limbs(name), ref.sum_limbs(name))), name


def test_aggregator_products_in_its_scratch_are_the_bits_of_part_product():
    from fedmla.protos.codec import ExactAggregator
    from fedmla.protos.codec.layout import Selection
    from fedmla.protos.codec.server import DecodedUpdate
    from fedmla.protos.codec.wire import DecodedTensors, Part
    g = torch.Generator().manual_seed(5)
    shapes = {"a": (300, 200), "b": (160, 520), "c": (96, 64), "d": (40,)}
    r = 12
    parts = {
        "a": Part(sel=Selection(), left=torch.randn(r, 300, generator=g), right=torch.randn(r, 200, generator=g)),
        "b": Part(sel=Selection(), side="left", basis=torch.randn(160, r, generator=g),
                  right=torch.randn(r, 520, generator=g)),
        "c": Part(sel=Selection(), side="right", basis=torch.randn(64, r, generator=g),
                  left=torch.randn(r, 96, generator=g)),
        "d": Part(sel=Selection(), value=torch.randn(40, generator=g)),
    }
    agg = ExactAggregator(shapes, 1, 1)
    agg.begin_round(None, None)
    update = DecodedUpdate(DecodedTensors(parts), None, 3, {})
    seen = []
    for name, x, sel in agg._products(update):
        assert torch.equal(x.view(torch.int32), parts[name].product().view(torch.int32)), name
        seen.append(name)
    assert seen == ["a", "b", "c", "d"]


def test_the_aggregate_has_the_one_thread_bits_on_any_thread_count():
    """Skinny low-rank terms (a few selected rows) come out of MKL with other last bits on
    two threads than on one. The aggregator forms its products on one BLAS thread whoever
    calls it, so its sum on a main thread with two torch threads (a benchmark, a Flower
    strategy) is the same integers as the terms formed on one MKL thread and summed."""
    import threading

    from fedmla.protos.codec import ExactAggregator, RoundPlan, SharedState, blas
    from fedmla.protos.codec.layout import Selection
    from fedmla.protos.codec.server import DecodedUpdate
    from fedmla.protos.codec.wire import DecodedTensors, Part
    set_local = blas._set_local_threads()
    if set_local is None:
        pytest.skip("torch does not link MKL here")
    g = torch.Generator().manual_seed(11)
    r = 12
    shapes = {"a": (9, 520), "b": (6, 256), "c": (3, 700), "d": (40, 64)}
    parts = {k: Part(sel=Selection(), left=torch.randn(r, m, generator=g), right=torch.randn(r, n, generator=g))
             for k, (m, n) in shapes.items()}
    update = DecodedUpdate(DecodedTensors(parts), None, 3, {})

    def one_thread_terms():      # in a thread of its own: torch's per-thread setup, then MKL on one thread
        torch.get_num_threads()
        set_local(1)
        out["terms"] = [p.left.t() @ p.right for p in parts.values()]

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        agg = ExactAggregator(shapes, 1, 1)
        agg.begin_round(None, RoundPlan(round=0, mask=torch.ones(1, 1, dtype=torch.bool), shared=SharedState(0)))
        agg.add("c0", update)
        two = [p.left.t() @ p.right for p in parts.values()]
        out = {}
        t = threading.Thread(target=one_thread_terms)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    if all(torch.equal(x, y) for x, y in zip(two, out["terms"])):
        pytest.skip("MKL rounds these products alike on one and two threads here: nothing to tell apart")
    ref = ExactSum(shapes)
    for k, x in zip(shapes, out["terms"]):
        ref.add_scaled(k, x, 3)
    for k in shapes:
        assert all(torch.equal(x, y) for x, y in zip(agg._sum.sum_limbs(k), ref.sum_limbs(k))), k
