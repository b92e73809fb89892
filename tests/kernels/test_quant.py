"""Row-wise int8 / int4 quantisation: Triton kernels (interpreted) against the reference."""

import pytest
import torch

from kernels_testlib import generator
from fedmla.kernels.quant import QMAX, dequantize_rows, quantize_rows, quantize_rows_naive
from fedmla.kernels.quant.triton import quantize_rows_triton
from fedmla.protos.tensors import decode_int_rows, encode_int_rows


def sample(R, C, seed=0):
    g = generator(seed)
    x = torch.randn(R, C, generator=g) * torch.rand(R, 1, generator=g) * 5
    if R > 2:
        x[2] = 0.0  # an all-zero row
    return x


SHAPES = [(1, 1), (7, 37), (3, 4100)]  # 4100 > the kernel's 4096 block: the row loop runs twice


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_nearest_matches_reference_exactly(bits, shape):
    x = sample(*shape)
    qn, sn = quantize_rows(x, bits, backend="naive")
    qt, st = quantize_rows(x, bits, backend="triton")
    assert qt.dtype == torch.int8 and st.dtype == torch.float32
    assert torch.equal(qt, qn) and torch.equal(st, sn)
    assert int(qt.abs().max()) <= QMAX[bits]
    # Round to nearest: error at most half a step per element.
    err = (dequantize_rows(qt, st, backend="triton") - x).abs()
    assert (err <= st[:, None] / 2 + 1e-6).all()
    if shape[0] > 2:
        assert st[2] == 0 and (qt[2] == 0).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_with_shared_noise_matches_reference(bits):
    x = sample(5, 300)
    noise = torch.rand(5, 300, generator=generator(9))
    qn, sn = quantize_rows_naive(x, bits, noise)
    qt, st = quantize_rows_triton(x, QMAX[bits], noise=noise)
    assert torch.equal(qt, qn) and torch.equal(st, sn)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_stochastic_rounding_is_reproducible_and_unbiased(backend):
    x = sample(2, 64, seed=1)
    q1, s = quantize_rows(x, 4, stochastic=True, seed=5, backend=backend)
    q2, _ = quantize_rows(x, 4, stochastic=True, seed=5, backend=backend)
    assert torch.equal(q1, q2)
    y = x / s[:, None]
    assert ((q1.float() == y.floor()) | (q1.float() == y.ceil())).all()
    draws = torch.stack([quantize_rows(x, 4, stochastic=True, seed=k, backend=backend)[0].float() for k in range(200)])
    mean = draws.mean(0) * s[:, None]
    # 200 draws of a {0, 1} step: the mean is within about 4 standard errors (0.5/sqrt(200) steps).
    assert ((mean - x).abs() <= 0.15 * s[:, None] + 1e-6).all()
    # ... whereas rounding to nearest is biased on some element by more than that.
    nearest = quantize_rows(x, 4, backend=backend)[0].float() * s[:, None]
    assert ((nearest - x).abs() > 0.15 * s[:, None]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_reference(dtype):
    x = sample(6, 50)
    q, s = quantize_rows(x, 8)
    a = dequantize_rows(q, s, dtype=dtype, backend="triton")
    b = dequantize_rows(q, s, dtype=dtype, backend="naive")
    assert a.dtype == dtype
    # fp32 is exact. For bf16 the interpreter's float->bf16 cast truncates where torch (and a
    # GPU) round to nearest even, so allow one bf16 step (2^-7 relative).
    tol = 0.0 if dtype == torch.float32 else 2.0 ** -7
    assert ((a.float() - b.float()).abs() <= tol * b.float().abs()).all()


def test_bf16_input():
    x = sample(4, 33).bfloat16()
    qn, sn = quantize_rows(x, 8, backend="naive")
    qt, st = quantize_rows(x, 8, backend="triton")
    assert torch.equal(qt, qn) and torch.equal(st, sn)


@pytest.mark.parametrize("bits", [8, 4])
def test_roundtrip_through_wire_format(bits):
    x = sample(5, 21)
    q, s = quantize_rows(x, bits, backend="triton")
    q2, s2, bits2 = decode_int_rows(encode_int_rows(q, s, bits))
    assert bits2 == bits and torch.equal(q2, q) and torch.equal(s2, s)


def test_bad_inputs_raise():
    x = sample(3, 4)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_rows(x, 2)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        quantize_rows(x[0])
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="x has dtype"):
        quantize_rows(x.long())
    q, s = quantize_rows(x)
    with pytest.raises(ValueError, match="q has dtype"):
        dequantize_rows(q.float(), s)
    with pytest.raises(ValueError, match="scales has 2 entries"):
        dequantize_rows(q, s[:2])
