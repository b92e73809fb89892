import pytest
import torch

from coordinator.codec.quant import dequantize_rows, error_bound, quantize_rows


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


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("stochastic", [False, True])
def test_error_within_bound(bits, stochastic):
    g = torch.Generator().manual_seed(bits + stochastic)
    x = torch.randn(50, 33, generator=g) * torch.logspace(-4, 2, 50)[:, None]
    q, s = quantize_rows(x, bits, stochastic, g)
    err = (dequantize_rows(q, s) - x).abs()
    bound = error_bound(s, stochastic)[:, None] * (1 + 1e-6) + 1e-12
    assert (err <= bound).all()
    assert q.abs().max() <= (127 if bits == 8 else 7)


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
        quantize_rows(torch.zeros(2, 2), 3)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows(torch.tensor([[float("nan")]]), 8)
