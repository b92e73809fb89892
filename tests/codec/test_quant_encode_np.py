"""The numpy encoder of quantised rows (quantize_rows_np + pack_codes_np + int_rows_message,
the client's path for round-to-nearest scales without numba) and the compiled one-pass encoder
(quantize_pack_rows with numba) give the torch path's codes, message bytes and dequantised
values, bit for bit, on the inputs where rounding, float16 scales and packing can differ."""

import numpy as np
import pytest
import torch

from fedmla.protos.codec import CodecConfig
from fedmla.protos.codec import quant
from fedmla.protos.codec.quant import (container_bits, dequantize_rows, quantize_pack_rows, quantize_rows,
                                       quantize_rows_np, scales_are_half, scales_are_half_np)
from fedmla.protos.codec.wire import _quant_encode
from fedmla.protos.tensors import encode_int_rows, int_rows_message, pack_codes_np, pack_int2, pack_int4


@pytest.fixture(params=["compiled", "numpy"])
def pack_path(request, monkeypatch):
    """quantize_pack_rows on both of its paths: the numba pass (after warm_up) and the numpy steps."""
    monkeypatch.setattr(quant, "_compiled", [])
    if request.param == "compiled" and not quant.warm_up():
        pytest.skip("numba not installed or FEDMLA_EXACT_KERNELS=numpy")
    return request.param


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
        raw = pack_codes_np(qn, container_bits(bits)) if qn.size else b""
        mn = int_rows_message(raw, qn.shape, sn, container_bits(bits), half_scales=half, compress=compress)
        assert mn.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True), what
        # the codec's entry point returns the same message and the same dequantised values
        cfg = CodecConfig(half_scales=half_scales, entropy_coding=compress)
        m2, d2 = _quant_encode(x, bits, cfg, torch.Generator())
        assert m2.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True), what
        assert torch.equal(d2.view(torch.int32), deq.float().view(torch.int32)), what


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("half_scales", [False, True])
def test_one_pass_encoder_gives_the_torch_encoders_bytes(pack_path, bits, half_scales):
    for what, x in _inputs():
        q, scales, msg, deq = _torch_path(x, bits, half_scales, compress=True)
        out = np.full(x.shape, np.nan, np.float32)
        raw, sn, half = quantize_pack_rows(x.numpy().astype(np.float32), bits, half_scales, out)
        assert _same_bits(sn, scales.numpy()), what
        assert half == (half_scales and scales_are_half(scales)), what
        assert _same_bits(out, deq.numpy()), what
        mn = int_rows_message(raw, tuple(x.shape), sn, container_bits(bits), half, compress=True)
        assert mn.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True), what


def _float16_edges() -> np.ndarray:
    """Every positive float16 value below 60000 and the float32 values around each midpoint
    between neighbours (the midpoint, one float32 step either side): where rounding to
    float16 can go wrong (ties to even, subnormals, binade edges)."""
    h = np.arange(0, np.float16(60000).view(np.uint16) + 1, dtype=np.uint16).view(np.float16).astype(np.float32)
    mid = ((h[:-1].astype(np.float64) + h[1:]) / 2).astype(np.float32)     # exact: 12 significant bits
    return np.unique(np.concatenate([h, mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf)),
                                     np.float32([2.0 ** -149, 2.0 ** -126, 2.0 ** -25, 3 * 2.0 ** -26])]))


@pytest.mark.parametrize("half_scales", [False, True])
def test_one_pass_encoder_rounds_scales_to_float16_as_numpy(pack_path, half_scales):
    # 2-bit rows [2s, s]: amax / 2 is exactly s, so every candidate scale is hit as it is
    s = _float16_edges()
    x = np.stack([2 * s, s], axis=1)
    assert np.array_equal(x[:, 0] / np.float32(2), s)
    for rows in (x, np.concatenate([x, np.float32([[2 * 61000.0, 0.0]])]),      # one scale past 60000: all float32
                 np.float32([[2 * 65504.0, 1.0], [2 * 65519.0, 3.0]]), np.float32([[2 * 65520.0, 1.0]])):
        q, scales = quantize_rows_np(rows, 2, half_scales)
        out = np.empty_like(rows)
        raw, sn, half = quantize_pack_rows(rows, 2, half_scales, out)
        assert _same_bits(sn, scales)
        assert half == (half_scales and scales_are_half_np(scales))
        assert raw == pack_codes_np(q, 2)


def test_one_pass_encoder_refuses_non_finite_values(pack_path):
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = np.ones((2, 4), np.float32)
        x[1, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            quantize_pack_rows(x, 4, True, np.empty_like(x))
    with pytest.raises(ValueError, match="bits must be"):
        quantize_pack_rows(np.ones((2, 2), np.float32), 5, False, np.empty((2, 2), np.float32))


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


def test_warm_up_loads_the_pass_the_encoder_then_runs(monkeypatch):
    """warm_up compiles (or loads from numba's cache) the pass for the argument types the
    encoder passes: encoding afterwards compiles nothing inside a round."""
    monkeypatch.setattr(quant, "_compiled", [])
    if not quant.warm_up():
        pytest.skip("numba is not installed or FEDMLA_EXACT_KERNELS=numpy")
    kernel = quant._compiled[0]
    loaded = list(kernel.signatures)
    assert loaded
    x = torch.randn(12, 40, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4, 8):
        _quant_encode(x, bits, CodecConfig(), None)
    assert list(kernel.signatures) == loaded
