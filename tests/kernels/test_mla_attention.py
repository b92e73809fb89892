"""MLA training attention: Triton kernel (interpreted) and SDPA path against the reference."""

import pytest
import torch

from fedmla.kernels.mla_attention import mla_attention

from kernels_testlib import rel_err, generator

FP32_TOL = 1e-3
BF16_TOL = 3e-2


def make_inputs(B, T, S, H, dn, dr, dv, dtype=torch.float32, seed=0):
    g = generator(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)  # noqa: E731
    q, kn, kp, v = mk(B, T, H, dn + dr), mk(B, S, H, dn), mk(B, S, dr), mk(B, S, H, dv)
    do = torch.randn(B, T, H, dv, generator=g).to(dtype)
    return (q, kn, kp, v), do


def run(backend, inputs, do, **kw):
    for t in inputs:
        t.grad = None
    out = mla_attention(*inputs, backend=backend, **kw)
    out.backward(do)
    return [out.detach()] + [t.grad.detach().clone() for t in inputs]


NAMES = ["out", "dq", "dk_nope", "dk_pe", "dv"]

# (B, T, S, H, dn, dr, dv): T = 1, 63, 130; non-power-of-two head dims (24, 40, 12).
SHAPES = [
    (2, 1, 1, 3, 16, 8, 16),
    (2, 63, 63, 3, 24, 8, 40),
    (1, 130, 130, 2, 32, 16, 24),
    (3, 37, 37, 4, 40, 12, 24),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}S{}H{}dn{}dr{}dv{}".format(*s))
@pytest.mark.parametrize("masked", [False, True], ids=["all-heads", "masked"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_matches_reference(shape, masked, backend):
    B, T, S, H, dn, dr, dv = shape
    heads = list(range(0, H, 2)) if masked else None  # every other head, starting at 0
    inputs, do = make_inputs(*shape)
    ref = run("naive", inputs, do, heads=heads)
    got = run(backend, inputs, do, heads=heads)
    for name, a, e in zip(NAMES, got, ref):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert rel_err(a, e) <= FP32_TOL, f"{name}: rel err {rel_err(a, e):.2e}"


@pytest.mark.parametrize("T,S,causal", [(5, 40, True), (7, 7, False), (33, 19, False), (40, 5, True)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cross_lengths_and_non_causal(T, S, causal, backend):
    """T < S aligns the causal mask to the end (chunked prefill); T > S leaves early rows empty (zero)."""
    inputs, do = make_inputs(2, T, S, 2, 16, 8, 24, seed=3)
    ref = run("naive", inputs, do, causal=causal)
    got = run(backend, inputs, do, causal=causal)
    for name, a, e in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, e) <= FP32_TOL, f"{name}: rel err {rel_err(a, e):.2e}"


def test_reference_causality():
    """The reference itself: the last query's output changes with the last key, the first does not."""
    (q, kn, kp, v), _ = make_inputs(1, 6, 6, 2, 8, 4, 8)
    out1 = mla_attention(q, kn, kp, v, backend="naive")
    v2 = v.detach().clone()
    v2[:, -1] += 1.0
    out2 = mla_attention(q, kn, kp, v2, backend="naive")
    assert torch.equal(out1[:, :-1], out2[:, :-1])
    assert not torch.allclose(out1[:, -1], out2[:, -1])


@pytest.mark.parametrize("heads", [None, [1, 3]])
def test_bf16_triton(heads):
    """bf16 inputs: the kernel computes in fp32 and rounds once; compare with the fp32 reference
    on the same (bf16-rounded) inputs, at a bf16 tolerance."""
    shape = (2, 63, 63, 4, 24, 8, 40)
    inputs, do = make_inputs(*shape, dtype=torch.bfloat16, seed=5)
    got = run("triton", inputs, do, heads=heads)
    inputs32 = [t.detach().float().requires_grad_(True) for t in inputs]
    ref = run("naive", inputs32, do.float(), heads=heads)
    for name, a, e in zip(NAMES, got, ref):
        assert a.dtype == torch.bfloat16, name
        assert rel_err(a, e) <= BF16_TOL, f"{name}: rel err {rel_err(a, e):.2e}"


@pytest.mark.parametrize("backend", ["triton", "torch", "naive"])
def test_masked_heads_cost_nothing(backend):
    """Inactive heads are never read: NaN in their inputs leaves active heads exact; their
    outputs and gradients are zero; the shared dk_pe only sums active heads."""
    shape = (2, 20, 20, 4, 16, 8, 16)
    inputs, do = make_inputs(*shape, seed=7)
    active, inactive = [0, 3], [1, 2]
    ref = run("naive", inputs, do, heads=active)
    with torch.no_grad():
        inputs[0][:, :, inactive] = float("nan")
        inputs[1][:, :, inactive] = float("nan")
        inputs[3][:, :, inactive] = float("nan")
    got = run(backend, inputs, do, heads=torch.tensor([True, False, False, True]))
    for name, a, e in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, e) <= FP32_TOL, name
    out, dq, dkn, dkp, dv = got
    assert (out[:, :, inactive] == 0).all()
    for g in (dq, dkn, dv):
        assert (g[:, :, inactive] == 0).all()
    # dk_pe equals the sum of per-head contributions of the active heads only.
    single = [run("naive", make_inputs(*shape, seed=7)[0], do, heads=[h])[3] for h in active]
    assert rel_err(dkp, single[0] + single[1]) <= FP32_TOL


def test_default_scale_and_dispatch():
    inputs, do = make_inputs(1, 9, 9, 2, 16, 8, 16)
    auto = mla_attention(*inputs)  # CPU -> torch path
    explicit = mla_attention(*inputs, scale=24 ** -0.5, backend="naive")
    assert rel_err(auto, explicit) <= FP32_TOL


@pytest.mark.parametrize("bad,match", [
    (lambda q, kn, kp, v: (q[0], kn, kp, v), "q must have 4 dimensions"),
    (lambda q, kn, kp, v: (q, kn, kp.unsqueeze(2), v), "k_pe must have 3 dimensions"),
    (lambda q, kn, kp, v: (q, kn[:, :, :1], kp, v), r"k_nope.*heads H"),
    (lambda q, kn, kp, v: (q, kn, kp[:, :-1], v), r"k_pe.*keys S"),
    (lambda q, kn, kp, v: (q, kn, kp[..., :-2], v), "q has head dim"),
    (lambda q, kn, kp, v: (q, kn, kp, v.bfloat16()), "must share one dtype"),
    (lambda q, kn, kp, v: (q.long(), kn, kp, v), "q has dtype"),
    (lambda q, kn, kp, v: (q, kn, kp, v[:1]), r"v has shape.*batch B"),
])
def test_bad_inputs_raise(bad, match):
    inputs, _ = make_inputs(2, 4, 4, 2, 8, 4, 8)
    with pytest.raises(ValueError, match=match):
        mla_attention(*bad(*[t.detach() for t in inputs]))


def test_bad_heads_and_backend():
    inputs, _ = make_inputs(1, 4, 4, 2, 8, 4, 8)
    with pytest.raises(ValueError, match="heads must be indices"):
        mla_attention(*inputs, heads=[0, 2])
    with pytest.raises(ValueError, match="boolean mask needs 2"):
        mla_attention(*inputs, heads=[True, False, True])
    with pytest.raises(ValueError, match="backend must be one of"):
        mla_attention(*inputs, backend="cuda")


@pytest.mark.parametrize("masked", [False, True], ids=["all-heads", "masked"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_batch_with_different_lengths(masked, backend):
    """A right-padded batch: keys past each request's length are masked; a request of
    length 0 gets zeros."""
    B, T, H = 4, 40, 3
    inputs, do = make_inputs(B, T, T, H, 24, 8, 40, seed=11)
    lengths = [40, 17, 1, 0]
    heads = [0, 2] if masked else None
    ref = run("naive", inputs, do, heads=heads, lengths=lengths)
    # The kernel never loads padding, so even NaN there is harmless; the SDPA path multiplies
    # masked (zero) probabilities with it, so it gets large finite garbage instead.
    junk = float("nan") if backend == "triton" else 1e4
    with torch.no_grad():
        for b, n in enumerate(lengths):
            inputs[1][b, n:] = junk
            inputs[2][b, n:] = junk
            inputs[3][b, n:] = junk
    got = run(backend, inputs, do, heads=heads, lengths=torch.tensor(lengths))
    for name, a, e in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, e) <= FP32_TOL, f"{name}: rel err {rel_err(a, e):.2e}"
    assert (got[0][3] == 0).all()
    for g in got[2:]:  # key-side gradients vanish past each length
        for b, n in enumerate(lengths):
            assert (g[b, n:] == 0).all()


def test_bad_lengths():
    inputs, _ = make_inputs(2, 4, 4, 2, 8, 4, 8)
    with pytest.raises(ValueError, match="lengths must lie in"):
        mla_attention(*inputs, lengths=[4, 5])
    with pytest.raises(ValueError, match="lengths must have shape"):
        mla_attention(*inputs, lengths=[4])


def test_no_active_head_gives_zeros():
    inputs, do = make_inputs(1, 5, 5, 2, 8, 4, 8)
    out, dq, dkn, dkp, dv = run("triton", inputs, do, heads=[])
    assert out.shape == (1, 5, 2, 8) and (out == 0).all()
    assert all((g == 0).all() for g in (dq, dkn, dkp, dv))


def test_bad_device_and_scale():
    (q, kn, kp, v), _ = make_inputs(1, 4, 4, 2, 8, 4, 8)
    with pytest.raises(ValueError, match="must share one device"):
        mla_attention(q, kn, kp.detach().to("meta"), v)
    with pytest.raises(ValueError, match="scale must be a positive"):
        mla_attention(q, kn, kp, v, scale=float("nan"))


@pytest.mark.parametrize("T,S", [(1, 1), (63, 63), (130, 130), (5, 40), (40, 5), (33, 50)])
@pytest.mark.parametrize("block", [7, 16, 128])
@pytest.mark.parametrize("masked", [False, True], ids=["all-heads", "masked"])
def test_chunked_cpu_path_matches_reference(T, S, block, masked):
    """The causal block path (query blocks against key prefixes, shared rope key never
    broadcast) with block sizes that do and do not divide T, against the reference."""
    from fedmla.kernels.mla_attention import mla_attention_chunked
    H = 4
    heads = torch.tensor([0, 3]) if masked else None
    inputs, do = make_inputs(2, T, S, H, 24, 8, 40, seed=T + S)
    ref = run("naive", inputs, do, heads=None if heads is None else heads.tolist())
    for t in inputs:
        t.grad = None
    out = mla_attention_chunked(*inputs, 32 ** -0.5, heads=heads, block=block)
    out.backward(do)
    got = [out.detach()] + [t.grad.detach().clone() for t in inputs]
    for name, a, e in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, e) <= FP32_TOL, f"{name}: rel err {rel_err(a, e):.2e}"


@pytest.mark.parametrize("T", [63, 300])
def test_padded_sdpa_path_matches_reference_causal(T):
    """SDPA with v padded to the qk dim: what the dispatch uses above CHUNKED_MAX_T."""
    from fedmla.kernels.mla_attention import mla_attention_sdpa
    inputs, do = make_inputs(1, T, T, 2, 24, 8, 16, seed=T)
    ref = run("naive", inputs, do)
    for t in inputs:
        t.grad = None
    out = mla_attention_sdpa(*inputs, 32 ** -0.5)
    out.backward(do)
    got = [out.detach()] + [t.grad.detach().clone() for t in inputs]
    for name, a, e in zip(NAMES, got, ref):
        assert rel_err(a, e) <= FP32_TOL, f"{name}: rel err {rel_err(a, e):.2e}"


def test_chunked_bf16_within_bf16_tolerance():
    from fedmla.kernels.mla_attention import mla_attention_chunked
    inputs32, do32 = make_inputs(2, 70, 70, 3, 16, 8, 24, seed=5)
    ref = run("naive", inputs32, do32)
    inputs = [t.detach().to(torch.bfloat16).requires_grad_(True) for t in inputs32]
    out = mla_attention_chunked(*inputs, 24 ** -0.5, block=32)
    out.backward(do32.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    got = [out.detach()] + [t.grad.detach() for t in inputs]
    for name, a, e in zip(NAMES, got, ref):
        assert rel_err(a.float(), e) <= BF16_TOL, f"{name}: rel err {rel_err(a.float(), e):.2e}"
