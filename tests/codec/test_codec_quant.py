import pytest
import torch

from fedmla.protos.codec.quant import dequantize_rows, error_bound, quantize_rows, scales_are_half


def test_int8_hand_computed():
    x = torch.tensor([[2.54, -1.0, 0.0], [0.0, 0.0, 0.0], [-1.27, 0.5, 0.071]])
    q, s = quantize_rows(x, 8)
    assert torch.allclose(s, torch.tensor([0.02, 0.0, 0.01]))
    assert q.tolist() == [[127, -50, 0], [0, 0, 0], [-127, 50, 7]]
    assert torch.equal(dequantize_rows(q, s)[1], torch.zeros(3))


def test_int4_hand_computed():
    x = torch.tensor([[0.875, -0.4375, 0.125, 0.3125]])
    q, s = quantize_rows(x, 4)
    assert s.tolist() == [0.125]
    assert q.tolist() == [[7, -4, 1, 2]]                               # -3.5 -> -4, 2.5 -> 2 (half to even)


def test_int2_hand_computed():
    # scale = amax / 2 = 0.5; levels (q + 1/2) * 0.5 in {-0.75, -0.25, 0.25, 0.75}
    x = torch.tensor([[1.0, -0.3, 0.1, -1.0, 0.0]])
    q, s = quantize_rows(x, 2)
    assert s.tolist() == [0.5]
    assert q.tolist() == [[1, -1, 0, -2, 0]]                           # 0 - 1/2 rounds half to even: code 0
    assert dequantize_rows(q, s, 2).tolist() == [[0.75, -0.25, 0.25, -0.75, 0.25]]


def test_int3_codes_stay_within_three():
    x = torch.tensor([[3.0, -1.4, 0.6, 2.2]])
    q, s = quantize_rows(x, 3)
    assert s.tolist() == [1.0]
    assert q.tolist() == [[3, -1, 1, 2]]


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("stochastic", [False, True])
def test_error_within_bound(bits, stochastic):
    g = torch.Generator().manual_seed(bits + stochastic)
    x = torch.randn(50, 33, generator=g) * torch.logspace(-4, 2, 50)[:, None]
    q, s = quantize_rows(x, bits, stochastic, g)
    err = (dequantize_rows(q, s, bits) - x).abs()
    bound = error_bound(s, stochastic)[:, None] * (1 + 1e-6) + 1e-12
    assert (err <= bound).all()
    lo, hi = {8: (-127, 127), 4: (-7, 7), 3: (-3, 3), 2: (-2, 1)}[bits]
    assert q.min() >= lo and q.max() <= hi


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_fitted_scales_lower_every_rows_squared_error(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(40, 200, generator=g)
    x[:, 0] *= 8                                                       # one outlier per row stretches amax
    q0, s0 = quantize_rows(x, bits)
    q1, s1 = quantize_rows(x, bits, fit=True)
    e0 = ((dequantize_rows(q0, s0, bits) - x) ** 2).sum(dim=1)
    e1 = ((dequantize_rows(q1, s1, bits) - x) ** 2).sum(dim=1)
    assert (e1 <= e0 * (1 + 1e-6)).all()
    assert float(e1.sum()) < 0.8 * float(e0.sum())                     # the outlier is clipped, the rest gains
    assert float(s1.mean()) < float(s0.mean())


def test_half_scales_are_float16_exact_and_used_for_the_codes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 17, generator=g) * 1e-3
    q, s = quantize_rows(x, 4, half_scales=True)
    assert scales_are_half(s)
    assert not scales_are_half(quantize_rows(x, 4)[1])
    assert (dequantize_rows(q, s, 4) - x).abs().max() <= float(s.max())   # codes chosen with the rounded scale
    big = torch.tensor([[1e7, 1.0]])                                   # scale beyond float16: kept float32
    assert quantize_rows(big, 8, half_scales=True)[1].tolist() == [pytest.approx(1e7 / 127)]


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.full((1, 20000), 0.3)
    x[0, 0] = 1.0                                                      # scale = 1/127
    q, s = quantize_rows(x, 8, True, g)
    mean = dequantize_rows(q, s)[0, 1:].mean()
    assert abs(float(mean) - 0.3) < 2e-4                               # nearest rounding would be off by 8e-4
    q2, s2 = quantize_rows(x, 8, False)
    assert abs(float(dequantize_rows(q2, s2)[0, 1:].mean()) - 0.3) > 5e-4


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        quantize_rows(torch.zeros(2, 2), 5)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows(torch.tensor([[float("nan")]]), 8)
