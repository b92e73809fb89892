"""The numpy encoder of quantised rows (quantize_rows_np + encode_int_rows_np, the client's
path for round-to-nearest scales) gives the torch path's codes, message bytes and
dequantised values, bit for bit, on the inputs where rounding and packing can differ."""

import numpy as np
import pytest
import torch

from fedmla.protos.codec import CodecConfig
from fedmla.protos.codec.quant import (container_bits, dequantize_rows, quantize_rows, quantize_rows_np,
                                       scales_are_half, scales_are_half_np)
from fedmla.protos.codec.wire import _quant_encode
from fedmla.protos.tensors import encode_int_rows, encode_int_rows_np, pack_codes_np, pack_int2, pack_int4


def _torch_path(x: torch.Tensor, bits: int, half_scales: bool, compress: bool):
    q, scales = quantize_rows(x, bits, half_scales=half_scales)
    half = half_scales and scales_are_half(scales)
    msg = encode_int_rows(q, scales, container_bits(bits), half_scales=half, compress=compress)
    return q, scales, msg, dequantize_rows(q, scales, bits)


def _inputs():
    g = torch.Generator().manual_seed(7)
    yield "gauss", torch.randn(12, 64, generator=g) * 1e-3
    yield "odd columns", torch.randn(5, 33, generator=g)
    yield "one column", torch.randn(7, 1, generator=g)
    yield "three columns", torch.randn(4, 3, generator=g)
    yield "zero rows", torch.zeros(3, 10)
    yield "some zero rows", torch.cat([torch.zeros(2, 9), torch.randn(2, 9, generator=g)])
    yield "huge (float32 scales)", torch.randn(4, 16, generator=g) * 1e9
    yield "mixed magnitudes", torch.randn(6, 20, generator=g) * torch.logspace(-30, 30, 6)[:, None]
    yield "subnormal", torch.full((2, 8), 1e-41) * torch.arange(1, 9)
    yield "empty columns", torch.zeros(4, 0)
    yield "no rows", torch.zeros(0, 5)
    # exact ties: every entry a half-integer multiple of a float16-exact scale
    ties = (torch.arange(-7, 8).float() + 0.5) / 7.5
    yield "ties", ties.repeat(3, 1) * torch.tensor([[1.0], [0.25], [3.0]])
    yield "negative zero", torch.tensor([[-0.0, 0.0, -0.0, 1.0]])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("half_scales", [False, True])
@pytest.mark.parametrize("compress", [False, True])
def test_numpy_encoder_gives_the_torch_encoders_bytes(bits, half_scales, compress):
    for what, x in _inputs():
        q, scales, msg, deq = _torch_path(x, bits, half_scales, compress)
        qn, sn = quantize_rows_np(x.numpy().astype(np.float32), bits, half_scales)
        assert np.array_equal(qn, q.numpy()), what
        assert np.array_equal(sn.view(np.int32), scales.numpy().view(np.int32)), what
        half = half_scales and scales_are_half_np(sn)
        mn = encode_int_rows_np(qn, sn, container_bits(bits), half_scales=half, compress=compress)
        assert mn.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True), what
        # the codec's entry point returns the same message and the same dequantised values
        cfg = CodecConfig(half_scales=half_scales, entropy_coding=compress)
        m2, d2 = _quant_encode(x, bits, cfg, torch.Generator())
        assert m2.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True), what
        assert torch.equal(d2.view(torch.int32), deq.float().view(torch.int32)), what


@pytest.mark.parametrize("bits", [2, 4])
def test_packing_matches_for_every_code_and_width(bits):
    lo, hi = (-2, 1) if bits == 2 else (-8, 7)
    codes = torch.arange(lo, hi + 1, dtype=torch.int8)
    for cols in range(1, 11):
        q = codes[torch.arange(3 * cols) % codes.numel()].reshape(3, cols)
        packed = (pack_int2 if bits == 2 else pack_int4)(q)
        assert pack_codes_np(q.numpy(), bits) == packed.numpy().tobytes(), cols


def test_numpy_encoder_refuses_what_the_torch_one_refuses():
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(2, 4)
        x[1, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            quantize_rows(x, 4)
        with pytest.raises(ValueError, match="non-finite"):
            quantize_rows_np(x.numpy(), 4)
    with pytest.raises(ValueError, match="bits must be"):
        quantize_rows_np(np.ones((2, 2), np.float32), 5)
    with pytest.raises(ValueError, match="2-D float32"):
        quantize_rows_np(np.ones(4, np.float32), 4)
