"""Tensors <-> ``fedmla.v1.Tensor`` messages: raw little-endian bytes, never pickle.

Decoding validates everything it reads (dtype, shape, byte length, element limit) and
raises :class:`TensorDecodeError` naming the problem; received bytes are only ever
reinterpreted (``torch.frombuffer`` / ``numpy.frombuffer``).

The coordinator decodes ~160 small tensors per update, so the received side has numpy
forms (:func:`decode_array`, :func:`int_rows_payload`, :func:`unpack_codes`): numpy's
per-call cost is ~1 us against torch's ~5-10 us, and a packed byte is unpacked with one
lookup in a 256-entry table instead of shifts, stacks and wheres. Both forms run the same
validation with the same messages.
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import numpy as np
import torch

from fedmla.protos.fedmla.v1 import types_pb2 as pb


class TensorDecodeError(ValueError):
    """A received tensor message is malformed."""


_TO_PB = {
    torch.float32: pb.FLOAT32, torch.bfloat16: pb.BFLOAT16, torch.float16: pb.FLOAT16, torch.float64: pb.FLOAT64,
    torch.int8: pb.INT8, torch.uint8: pb.UINT8, torch.int32: pb.INT32, torch.int64: pb.INT64, torch.bool: pb.BOOL,
}
_FROM_PB = {v: k for k, v in _TO_PB.items()}
_ITEMSIZE = {pb.FLOAT32: 4, pb.BFLOAT16: 2, pb.FLOAT16: 2, pb.FLOAT64: 8, pb.INT8: 1, pb.UINT8: 1,
             pb.INT32: 4, pb.INT64: 8, pb.BOOL: 1}


def dtype_name(code: int) -> str:
    return pb.DType.Name(code) if code in pb.DType.values() else f"unknown({code})"


def encode_tensor(t: torch.Tensor) -> pb.Tensor:
    """A plain (unquantised) tensor message; the tensor is copied to CPU, contiguous."""
    if t.dtype not in _TO_PB:
        raise TypeError(f"cannot encode tensor of dtype {t.dtype}")
    t = t.detach().to("cpu").contiguous()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(dtype=_TO_PB[t.dtype], shape=list(t.shape), data=data)


MAX_INFLATED_BYTES = 256 << 20   # a compressed tensor can claim no more than this once inflated


def deflate(data: bytes) -> bytes:
    """Raw DEFLATE of ``data`` (entropy coding only: quantised codes have few repeats)."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return co.compress(data) + co.flush()


def _payload(msg: pb.Tensor, expected: int, what: str) -> bytes:
    """``msg.data`` decoded to exactly ``expected`` bytes (inflated when compressed)."""
    if msg.compression == pb.COMPRESSION_NONE:
        return msg.data
    if msg.compression != pb.DEFLATE:
        raise TensorDecodeError(f"{what}: unknown compression {msg.compression}")
    if expected > MAX_INFLATED_BYTES:
        raise TensorDecodeError(f"{what}: a compressed tensor may hold at most {MAX_INFLATED_BYTES} bytes, "
                                f"its shape needs {expected}")
    try:
        out = inflate_exact(msg.data, expected)
    except zlib.error as e:
        raise TensorDecodeError(f"{what}: corrupt DEFLATE data ({e})") from None
    if out is None:
        raise TensorDecodeError(f"{what}: DEFLATE data does not inflate to the expected {expected} bytes")
    return out


def inflate_exact(data: bytes, expected: int) -> bytes | None:
    """Raw DEFLATE ``data`` inflated, never to more than ``expected`` + 1 bytes (the bound is
    set before anything is allocated); None unless the whole stream gives exactly
    ``expected`` bytes with nothing after it. Corrupt data raises ``zlib.error``. Callers
    bound ``expected`` (MAX_INFLATED_BYTES) first."""
    d = zlib.decompressobj(-15)
    out = d.decompress(data, expected + 1)
    if len(out) != expected or not d.eof or d.unused_data or d.unconsumed_tail:
        return None
    return out


MAX_DIMS = 8
MAX_DIM_PRODUCT = 1 << 40


def _check_shape(shape, what: str, max_elements: int | None) -> int:
    if shape and min(shape) < 0:
        raise TensorDecodeError(f"{what}: negative dimension in shape {list(shape)}")
    if len(shape) > MAX_DIMS:
        raise TensorDecodeError(f"{what}: {len(shape)} dimensions exceeds the limit of {MAX_DIMS}")
    n = math.prod(shape)
    # Each dimension alone must be addressable, even when another one is 0 (no elements):
    # torch computes strides from the nonzero ones. (With no 0 dimension that product is n.)
    if (n if n else math.prod(d for d in shape if d)) > MAX_DIM_PRODUCT:
        raise TensorDecodeError(f"{what}: shape {list(shape)} is too large to address")
    if max_elements is not None and n > max_elements:
        raise TensorDecodeError(f"{what}: {n} elements exceeds the limit of {max_elements}")
    return n


def _plain_payload(msg: pb.Tensor, what: str, max_elements: int | None, allowed: set[int] | frozenset[int] | None
                   ) -> tuple[bytes, tuple[int, ...], int]:
    """(data, shape, element count) of a plain message, every check of :func:`decode_tensor` made."""
    if msg.HasField("quant") and msg.quant.scheme != pb.Quantization.SCHEME_NONE:
        raise TensorDecodeError(f"{what}: quantised tensor where a plain one was expected")
    if msg.dtype not in _FROM_PB:
        raise TensorDecodeError(f"{what}: unsupported dtype {dtype_name(msg.dtype)}")
    if allowed is not None and msg.dtype not in allowed:
        names = ", ".join(sorted(dtype_name(a) for a in allowed))
        raise TensorDecodeError(f"{what}: dtype {dtype_name(msg.dtype)} not allowed here (expected {names})")
    shape = tuple(msg.shape)
    n = _check_shape(shape, what, max_elements)
    expected = n * _ITEMSIZE[msg.dtype]
    data = _payload(msg, expected, what)
    if len(data) != expected:
        raise TensorDecodeError(f"{what}: {len(data)} data bytes for shape {list(shape)} "
                                f"and dtype {dtype_name(msg.dtype)} (expected {expected})")
    return data, shape, n


def decode_tensor(msg: pb.Tensor, what: str = "tensor", max_elements: int | None = None,
                  allowed: set[int] | None = None) -> torch.Tensor:
    """The tensor a plain message holds (a fresh, writable CPU tensor).

    ``allowed`` restricts the accepted dtypes (``fedmla.v1.DType`` codes).
    Quantised messages are rejected here: use :func:`decode_int_rows` for those.
    """
    data, shape, n = _plain_payload(msg, what, max_elements, allowed)
    if n == 0:
        return torch.empty(shape, dtype=_FROM_PB[msg.dtype])
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(_FROM_PB[msg.dtype]).reshape(shape)


# little-endian numpy dtypes of the plain float types the numpy decoder reads
_NP = {pb.FLOAT32: np.dtype("<f4"), pb.FLOAT16: np.dtype("<f2"), pb.FLOAT64: np.dtype("<f8")}


def decode_array(msg: pb.Tensor, what: str = "tensor", max_elements: int | None = None,
                 allowed: set[int] | frozenset[int] | None = None) -> np.ndarray:
    """:func:`decode_tensor` as a read-only numpy array viewing the message's bytes (float
    dtypes FLOAT32/FLOAT16/FLOAT64 only; the same checks and messages)."""
    data, shape, n = _plain_payload(msg, what, max_elements, allowed)
    if msg.dtype not in _NP:
        raise TensorDecodeError(f"{what}: dtype {dtype_name(msg.dtype)} has no numpy decoder")
    return np.frombuffer(data, dtype=_NP[msg.dtype], count=n).reshape(shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(R, C) int8 values in [-8, 7] -> (R, ceil(C/2)) uint8, low nibble first."""
    R, C = q.shape
    if C % 2:
        q = torch.cat([q, torch.zeros(R, 1, dtype=q.dtype, device=q.device)], dim=1)
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: (R, ceil(C/2)) uint8 -> (R, C) int8."""
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    both = torch.stack([lo, hi], dim=-1).reshape(packed.size(0), -1)[:, :cols]
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def pack_int2(q: torch.Tensor) -> torch.Tensor:
    """(R, C) int8 values in [-2, 1] -> (R, ceil(C/4)) uint8 of 2-bit codes q + 2, lowest bits first."""
    R, C = q.shape
    pad = (-C) % 4
    c = (q.to(torch.int16) + 2).clamp_(0, 3).to(torch.uint8)
    if pad:
        c = torch.cat([c, torch.zeros(R, pad, dtype=torch.uint8, device=c.device)], dim=1)
    return (c[:, 0::4] | (c[:, 1::4] << 2) | (c[:, 2::4] << 4) | (c[:, 3::4] << 6)).contiguous()


def unpack_int2(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int2`: (R, ceil(C/4)) uint8 -> (R, C) int8 in [-2, 1]."""
    parts = [((packed >> shift) & 0x3) for shift in (0, 2, 4, 6)]
    codes = torch.stack(parts, dim=-1).reshape(packed.size(0), -1)[:, :cols]
    return (codes.to(torch.int16) - 2).to(torch.int8)


# bits -> (scheme, dtype, bytes per row of C values)
_INT_ROWS = {
    8: (pb.Quantization.INT8_ROW, pb.INT8, lambda c: c),
    4: (pb.Quantization.INT4_ROW, pb.INT4, lambda c: (c + 1) // 2),
    2: (pb.Quantization.INT2_ROW, pb.INT2, lambda c: (c + 3) // 4),
}
_INT_ROWS_BY_SCHEME = {scheme: (bits, dtype, row_bytes) for bits, (scheme, dtype, row_bytes) in _INT_ROWS.items()}


def encode_int_rows(q: torch.Tensor, scales: torch.Tensor, bits: int, stochastic: bool = False,
                    half_scales: bool = False, compress: bool = False) -> pb.Tensor:
    """Row-quantised (R, C) tensor: int8 (bits=8), packed int4 (bits=4) or packed 2-bit
    codes (bits=2, q in [-2, 1] standing for q + 0.5) with one scale per row. Scales go
    as float32, or as float16 when ``half_scales`` (the caller must then have quantised
    with float16-representable scales). ``compress``: DEFLATE the packed codes when that is
    smaller. The message's shape is the logical (R, C)."""
    if q.dim() != 2 or scales.shape != (q.size(0),):
        raise ValueError(f"need q (R, C) and scales (R,), got {tuple(q.shape)} and {tuple(scales.shape)}")
    if bits not in _INT_ROWS:
        raise ValueError(f"bits must be 8, 4 or 2, got {bits}")
    scheme, dtype, _ = _INT_ROWS[bits]
    data = {8: lambda t: t, 4: pack_int4, 2: pack_int2}[bits](q.to(torch.int8))
    data = data.detach().cpu().contiguous()
    raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    packed = deflate(raw) if compress and raw else raw
    return pb.Tensor(
        dtype=dtype, shape=list(q.shape), data=packed if len(packed) < len(raw) else raw,
        quant=pb.Quantization(scheme=scheme, scales=encode_tensor(scales.half() if half_scales else scales.float()),
                              stochastic=stochastic),
        compression=pb.DEFLATE if len(packed) < len(raw) else pb.COMPRESSION_NONE,
    )


def pack_codes_np(q: np.ndarray, bits: int) -> bytes:
    """:func:`pack_int4` / :func:`pack_int2` (or plain int8 for ``bits`` 8) of (R, C) int8
    codes in numpy: the same bytes."""
    if bits == 8:
        return q.astype(np.int8, copy=False).tobytes()
    R, C = q.shape
    per = 2 if bits == 4 else 4
    pad = (-C) % per
    if bits == 4:
        u = (q.astype(np.uint8) & np.uint8(0xF))           # two's complement nibble
    else:
        u = np.clip(q.astype(np.int16) + 2, 0, 3).astype(np.uint8)
    if pad:
        u = np.concatenate([u, np.zeros((R, pad), np.uint8)], axis=1)
    if bits == 4:
        out = u[:, 0::2] | (u[:, 1::2] << np.uint8(4))
    else:
        out = u[:, 0::4] | (u[:, 1::4] << np.uint8(2)) | (u[:, 2::4] << np.uint8(4)) | (u[:, 3::4] << np.uint8(6))
    return out.tobytes()


def int_rows_message(raw: bytes, shape: tuple[int, int], scales: np.ndarray, bits: int, half_scales: bool = False,
                     compress: bool = False) -> pb.Tensor:
    """:func:`encode_int_rows` (``stochastic=False``) of codes already packed: the same
    message. ``raw`` holds the (R, C) codes of ``shape`` in :func:`pack_codes_np`'s layout
    (b"" when there are none), ``scales`` (R,) float32."""
    if bits not in _INT_ROWS:
        raise ValueError(f"bits must be 8, 4 or 2, got {bits}")
    scheme, dtype, _ = _INT_ROWS[bits]
    packed = deflate(raw) if compress and raw else raw
    smaller = len(packed) < len(raw)
    sc = scales.astype(np.float16 if half_scales else np.float32)
    return pb.Tensor(
        dtype=dtype, shape=list(shape), data=packed if smaller else raw,
        quant=pb.Quantization(scheme=scheme, scales=pb.Tensor(dtype=pb.FLOAT16 if half_scales else pb.FLOAT32,
                                                                shape=[sc.shape[0]], data=sc.tobytes()),
                              stochastic=False),
        compression=pb.DEFLATE if smaller else pb.COMPRESSION_NONE,
    )


# Unpacking tables, indexed by the packed byte: the int8 codes it holds, lowest bits first,
# as one uint16 (int4: 2 codes) or uint32 (int2: 4 codes) per byte, so that unpacking is
# one np.take on a flat table (several times faster than indexing a (256, k) table).
_BYTES = np.arange(256, dtype=np.int16)
_CODES4 = np.stack([_BYTES & 0xF, _BYTES >> 4], axis=1)
_CODES4 = np.where(_CODES4 >= 8, _CODES4 - 16, _CODES4).astype(np.int8)                     # (256, 2)
_CODES2 = (np.stack([(_BYTES >> s) & 0x3 for s in (0, 2, 4, 6)], axis=1) - 2).astype(np.int8)   # (256, 4)
_UNPACK = {4: np.ascontiguousarray(_CODES4).view(np.uint16).reshape(256),
           2: np.ascontiguousarray(_CODES2).view(np.uint32).reshape(256)}


def unpack_codes(data: bytes, rows: int, cols: int, bits: int) -> np.ndarray:
    """(rows, cols) int8 codes of ``bits``-bit packed rows (:func:`pack_int4` /
    :func:`pack_int2` layout, or plain int8): one table lookup per byte. ``data`` must
    hold exactly ``rows`` packed rows (checked by the caller). A view when ``bits`` is 8."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.view(np.int8).reshape(rows, cols)
    if not rows:
        return np.zeros((0, cols), np.int8)
    codes = _UNPACK[bits].take(raw).view(np.int8).reshape(rows, -1)
    return codes[:, :cols] if codes.shape[1] != cols else codes


_SCALE_DTYPES = frozenset({pb.FLOAT32, pb.FLOAT16})


class IntRows(NamedTuple):
    """A validated row-quantised message, not yet unpacked."""

    data: bytes          # the packed codes, R rows of ceil(C * bits / 8) bytes
    rows: int
    cols: int
    bits: int            # container width: 8, 4 or 2
    scales: np.ndarray   # (R,) float32, all finite
    scale_max: float     # max |scale| (0.0 without rows)


def int_rows_payload(msg: pb.Tensor, what: str = "tensor", max_elements: int | None = None) -> IntRows:
    """A row-quantised message after every check :func:`decode_int_rows` makes (the same
    messages, in the same order); nothing unpacked yet."""
    scheme = msg.quant.scheme if msg.HasField("quant") else pb.Quantization.SCHEME_NONE
    if scheme not in _INT_ROWS_BY_SCHEME:
        raise TensorDecodeError(f"{what}: expected a row-quantised tensor, got scheme {scheme}")
    shape = tuple(msg.shape)
    if len(shape) != 2:
        raise TensorDecodeError(f"{what}: row-quantised tensors are 2-D, got shape {list(shape)}")
    _check_shape(shape, what, max_elements)
    R, C = shape
    bits, want_dtype, row_bytes_of = _INT_ROWS_BY_SCHEME[scheme]
    if msg.dtype != want_dtype:
        raise TensorDecodeError(f"{what}: scheme {pb.Quantization.Scheme.Name(scheme)} needs dtype "
                                f"{dtype_name(want_dtype)}, got {dtype_name(msg.dtype)}")
    row_bytes = row_bytes_of(C)
    data = _payload(msg, R * row_bytes, what)
    if len(data) != R * row_bytes:
        raise TensorDecodeError(f"{what}: {len(data)} data bytes for {bits}-bit shape {list(shape)} "
                                f"(expected {R * row_bytes})")
    # One scale per row: the bound is checked from the shape before anything is inflated.
    scales = decode_array(msg.quant.scales, f"{what}.scales", max_elements=R,
                          allowed=_SCALE_DTYPES).astype(np.float32)
    if scales.shape != (R,):
        raise TensorDecodeError(f"{what}: {tuple(scales.shape)} scales for {R} rows")
    # max propagates NaN (and keeps an infinity): "all finite" in one reduction
    scale_max = float(np.maximum.reduce(np.abs(scales))) if R else 0.0
    if not math.isfinite(scale_max):
        raise TensorDecodeError(f"{what}: non-finite quantisation scale")
    return IntRows(data, R, C, bits, scales, scale_max)


def decode_int_rows(msg: pb.Tensor, what: str = "tensor", max_elements: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(q int8 (R, C), scales float32 (R,), bits) from a row-quantised message."""
    m = int_rows_payload(msg, what, max_elements)
    q = torch.empty((m.rows, m.cols), dtype=torch.int8)
    q.numpy()[...] = unpack_codes(m.data, m.rows, m.cols, m.bits)
    return q, torch.from_numpy(m.scales), m.bits
