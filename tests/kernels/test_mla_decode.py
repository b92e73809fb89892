"""Absorbed decode: split-T Triton kernel (interpreted) and bmm path against the reference."""

import pytest
import torch

from fedmla.kernels.mla_decode import mla_decode
from kernels_testlib import rel_err, generator


def make(B, H, c, dr, T, dtype=torch.float32, seed=0):
    g = generator(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(B, H, c), mk(B, H, dr), mk(B, T, c), mk(B, T, dr)


CASES = [
    # (B, H, c, dr, Tmax, lengths)
    (1, 1, 16, 8, 1, [1]),
    (3, 5, 40, 8, 130, [130, 63, 1]),       # different lengths in one batch, non-pow2 H and c
    (2, 16, 64, 16, 200, [200, 129]),
    (4, 3, 24, 6, 63, [0, 63, 17, 32]),     # an empty request gets zeros
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}c{c[2]}dr{c[3]}T{c[4]}")
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
def test_triton_matches_reference(case, num_splits):
    B, H, c, dr, T, lengths = case
    ql, qp, kv, pe = make(B, H, c, dr, T)
    ref = mla_decode(ql, qp, kv, pe, lengths, scale=0.2, backend="naive")
    got = mla_decode(ql, qp, kv, pe, lengths, scale=0.2, num_splits=num_splits, backend="triton")
    assert got.shape == (B, H, c)
    assert rel_err(got, ref) <= 1e-3
    for b, n in enumerate(lengths):
        if n == 0:
            assert (got[b] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}c{c[2]}dr{c[3]}T{c[4]}")
def test_torch_path_matches_reference(case):
    B, H, c, dr, T, lengths = case
    ql, qp, kv, pe = make(B, H, c, dr, T, seed=1)
    ref = mla_decode(ql, qp, kv, pe, lengths, scale=0.2, backend="naive")
    assert rel_err(mla_decode(ql, qp, kv, pe, lengths, scale=0.2), ref) <= 1e-3


def test_cache_rows_beyond_length_are_ignored():
    ql, qp, kv, pe = make(2, 4, 32, 8, 50)
    lengths = [20, 35]
    a = mla_decode(ql, qp, kv, pe, lengths, num_splits=3, backend="triton")
    kv2, pe2 = kv.clone(), pe.clone()
    kv2[0, 20:] = float("nan")
    pe2[1, 35:] = float("nan")
    for backend in ("triton", "torch"):
        b = mla_decode(ql, qp, kv2, pe2, lengths, num_splits=3, backend=backend)
        assert torch.isfinite(b).all()
        assert rel_err(b, a) <= 1e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16(backend):
    ql, qp, kv, pe = make(2, 8, 48, 16, 100, dtype=torch.bfloat16, seed=2)
    lengths = [100, 41]
    got = mla_decode(ql, qp, kv, pe, lengths, num_splits=2, backend=backend)
    ref = mla_decode(ql.float(), qp.float(), kv.float(), pe.float(), lengths, backend="naive")
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) <= 2e-2


def test_matches_per_head_attention():
    """Absorbed decode over the latent equals attention with per-head keys k = W_UK^T c and
    values c (the identity that lets MLA cache only the latent)."""
    g = generator(4)
    B, H, c, dn, dr, T = 1, 3, 20, 12, 8, 30
    w_uk = torch.randn(H, dn, c, generator=g)
    q_nope, qp = torch.randn(B, H, dn, generator=g), torch.randn(B, H, dr, generator=g)
    kv, pe = torch.randn(B, T, c, generator=g), torch.randn(B, T, dr, generator=g)
    ql = torch.einsum("bhd,hdc->bhc", q_nope, w_uk)
    k_nope = torch.einsum("btc,hdc->bthd", kv, w_uk)
    scores = torch.einsum("bhd,bthd->bht", q_nope, k_nope) + torch.einsum("bhr,btr->bht", qp, pe)
    expected = torch.einsum("bht,btc->bhc", (scores * 0.3).softmax(-1), kv)
    got = mla_decode(ql, qp, kv, pe, None, scale=0.3, num_splits=2, backend="triton")
    assert rel_err(got, expected) <= 1e-3


def test_bad_inputs_raise():
    ql, qp, kv, pe = make(2, 4, 16, 8, 10)
    with pytest.raises(ValueError, match="q_latent must have 3 dimensions"):
        mla_decode(ql[0], qp, kv, pe)
    with pytest.raises(ValueError, match=r"kv_cache.*latent width c"):
        mla_decode(ql, qp, kv[..., :8], pe)
    with pytest.raises(ValueError, match=r"pe_cache.*cache length"):
        mla_decode(ql, qp, kv, pe[:, :5])
    with pytest.raises(ValueError, match="lengths must lie in"):
        mla_decode(ql, qp, kv, pe, [3, 11])
    with pytest.raises(ValueError, match="lengths must have shape"):
        mla_decode(ql, qp, kv, pe, [3])
    with pytest.raises(ValueError, match="lengths must hold integers"):
        mla_decode(ql, qp, kv, pe, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="must share one dtype"):
        mla_decode(ql, qp, kv.bfloat16(), pe)
    with pytest.raises(ValueError, match="num_splits"):
        mla_decode(ql, qp, kv, pe, num_splits=0)


def test_bad_device_and_scale():
    ql, qp, kv, pe = make(1, 2, 16, 8, 4)
    with pytest.raises(ValueError, match="must share one device"):
        mla_decode(ql, qp, kv.to("meta"), pe)
    with pytest.raises(ValueError, match="scale must be a positive"):
        mla_decode(ql, qp, kv, pe, scale=-1.0)
