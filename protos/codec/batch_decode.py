"""The coordinator's decode of an update's quantised tensors in one compiled pass.

:meth:`TensorCodec.decode <.wire.TensorCodec.decode>` decodes the ~160 tensors of an
update one by one: per tensor ~15 numpy / torch calls on small arrays, ~9 ms of Python per
update on the small preset, all of it holding the GIL against the other ingest thread and
the gRPC loop. Here the per-tensor Python is only reading the message's fields and checking
them against the plan; the packed codes of every tensor are then unpacked, range-checked,
dequantised and checked finite by one compiled call that releases the GIL.

The path is strict and narrow: it accepts an update only when every tensor has exactly the
plan's shape, the run's bit width, a known compression and plain float16/float32 scales,
and nothing fails any check. In every other case (including every malformed update)
:func:`decode_tensors` returns None and the caller runs :meth:`TensorCodec.decode`, which
refuses what it always refused, with its message. What it accepts, the per-tensor decoder
accepts too, and it gives the same float32 bits (the same float32 arithmetic:
``(float32(code) + shift) * scale``); tests/codec/test_batch_decode.py compares both.

Every tensor is written at a 64-byte aligned place of one buffer, as torch aligns a fresh
tensor (the low-rank products, MKL matmuls, keep their bits).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch

from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import TensorDecodeError, _payload

from .layout import RoundPlan
from .quant import _shift, code_range, container_bits
from .wire import DecodedTensors, Part, TensorCodec, UpdateDecodeError

_ALIGN = 16                    # float32 elements: 64 bytes, torch's CPU alignment
# container bits -> (scheme, dtype, bytes per row of C codes)
_CONTAINER = {
    8: (pb.Quantization.INT8_ROW, pb.INT8, lambda c: c),
    4: (pb.Quantization.INT4_ROW, pb.INT4, lambda c: (c + 1) // 2),
    2: (pb.Quantization.INT2_ROW, pb.INT2, lambda c: (c + 3) // 4),
}
_SCALE_ITEMSIZE = {pb.FLOAT16: 2, pb.FLOAT32: 4}
# meta columns: code offset, rows, cols, container bits, out offset, lowest code, highest code,
# scale offset, 2-bit shift (0/1)
_META = 9


@functools.cache
def _kernel():
    """The compiled pass, or None without numba or when ``FEDMLA_EXACT_KERNELS=numpy``."""
    if os.environ.get("FEDMLA_EXACT_KERNELS", "numba") == "numpy":
        return None
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def dequantize_all(codes, meta, scales, out):
        """Unpack, check and dequantise every tensor of ``meta`` into ``out``; -1 when all
        are valid, else the index of the first tensor with a code out of its range or a
        non-finite scale or value (``out`` then partly written)."""
        for t in range(meta.shape[0]):
            co, rows, cols, cb = meta[t, 0], meta[t, 1], meta[t, 2], meta[t, 3]
            oo, lo, hi, so = meta[t, 4], meta[t, 5], meta[t, 6], meta[t, 7]
            shift = np.float32(0.5) if meta[t, 8] else np.float32(0.0)
            row_bytes = cols if cb == 8 else ((cols + 1) // 2 if cb == 4 else (cols + 3) // 4)
            for i in range(rows):
                s = scales[so + i]
                if not np.isfinite(s):
                    return t
                base = co + i * row_bytes
                ob = oo + i * cols
                bad = False
                if cb == 4:                   # one loop per container width: no branch per code
                    for j in range(cols):
                        q = np.int64((codes[base + (j >> 1)] >> (4 * (j & 1))) & 0xF)
                        q -= (q >> 3) << 4                    # nibble >= 8: two's complement
                        v = (np.float32(q) + shift) * s
                        bad |= (q < lo) | (q > hi) | (not np.isfinite(v))
                        out[ob + j] = v
                elif cb == 2:
                    for j in range(cols):
                        q = np.int64((codes[base + (j >> 2)] >> (2 * (j & 3))) & 0x3) - 2
                        v = (np.float32(q) + shift) * s
                        bad |= (q < lo) | (q > hi) | (not np.isfinite(v))
                        out[ob + j] = v
                else:
                    for j in range(cols):
                        q = np.int64(codes[base + j])
                        q -= (q >> 7) << 8                    # byte >= 128: two's complement
                        v = (np.float32(q) + shift) * s
                        bad |= (q < lo) | (q > hi) | (not np.isfinite(v))
                        out[ob + j] = v
                if bad:
                    return t
        return -1

    return dequantize_all


def warm_up() -> bool:
    """Compile (or load from numba's cache) the pass now; True when it is in use."""
    k = _kernel()
    if k is None:
        return False
    meta = np.array([[0, 1, 2, 4, 0, -3, 3, 0, 0]], dtype=np.int64)
    # the argument types of a real call: read-only codes (a view of bytes), fresh arrays
    k(np.frombuffer(b"\x00", dtype=np.uint8), meta, np.ones(1, np.float32), np.zeros(2, np.float32))
    return True


class _Collect:
    """The validated pieces of the tensors of one update, gathered for the compiled pass."""

    def __init__(self):
        self.codes: list[bytes] = []
        self.half: list[bytes] = []     # float16 scales, in order
        self.full: list[bytes] = []     # float32 scales, in order
        self.meta: list[list[int]] = []
        self.code_at = 0
        self.out_at = 0
        self.half_at = 0
        self.full_at = 0

    def tensor(self, msg: pb.Tensor, rows: int, cols: int, bits: int) -> int | None:
        """Queue one row-quantised tensor of exactly (rows, cols); its offset in the output
        buffer, or None when it is not one this path takes."""
        cb = container_bits(bits)
        scheme, dtype, row_bytes_of = _CONTAINER[cb]
        if (not msg.HasField("quant") or msg.quant.scheme != scheme or msg.dtype != dtype
                or list(msg.shape) != [rows, cols]):
            return None
        expected = rows * row_bytes_of(cols)
        try:
            data = _payload(msg, expected, "")
        except TensorDecodeError:
            return None
        if len(data) != expected:
            return None
        sc = msg.quant.scales
        size = _SCALE_ITEMSIZE.get(sc.dtype)
        if (size is None or sc.compression != pb.COMPRESSION_NONE
                or (sc.HasField("quant") and sc.quant.scheme != pb.Quantization.SCHEME_NONE)
                or list(sc.shape) != [rows] or len(sc.data) != rows * size):
            return None
        lo, hi = code_range(bits)
        if size == 2:
            self.half.append(sc.data)
            scale_at = -1 - self.half_at            # resolved once the float16 count is known
            self.half_at += rows
        else:
            self.full.append(sc.data)
            scale_at = self.full_at
            self.full_at += rows
        at = self.out_at
        self.meta.append([self.code_at, rows, cols, cb, at, lo, hi, scale_at, 1 if _shift(bits) else 0])
        self.codes.append(data)
        self.code_at += expected
        self.out_at += -(-rows * cols // _ALIGN) * _ALIGN
        return at

    def run(self, kernel) -> torch.Tensor | None:
        """The output buffer with every tensor dequantised, or None when one is refused."""
        meta = np.array(self.meta, dtype=np.int64).reshape(-1, _META)
        half = np.frombuffer(b"".join(self.half), dtype="<f2").astype(np.float32)
        full = np.frombuffer(b"".join(self.full), dtype="<f4")
        scales = np.concatenate([half, full])        # a fresh, writable float32 array
        # float16 scales first, then float32: offsets of the float32 ones move by the count
        # of float16 ones; the float16 ones were numbered -1 - offset
        col = meta[:, 7]
        meta[:, 7] = np.where(col < 0, -1 - col, col + half.size)
        buf = torch.empty(max(self.out_at, 1), dtype=torch.float32)
        codes = np.frombuffer(b"".join(self.codes), dtype=np.uint8)
        if kernel(codes, meta, scales, buf.numpy()) >= 0:
            return None
        return buf


def decode_tensors(tc: TensorCodec, factors, dense, plan: RoundPlan) -> DecodedTensors | None:
    """An uplink update's tensors, as ``tc.decode(factors, dense, plan, uplink=True)`` gives
    them, or None when this path does not take the update (the caller then runs
    ``tc.decode``, which gives them or refuses with its own error)."""
    kernel = _kernel()
    if kernel is None or tc.cfg.sparse(True):
        return None
    col = _Collect()
    pending = []              # (name, sel, side, basis, left at, right at, shape) / dense
    seen = set()
    try:
        for f in factors:
            name = f.name
            if name not in tc.shapes or name in seen:
                return None
            seen.add(name)
            sel, kind, side, b = tc._layout(name, plan, True)
            if kind != "lowrank":
                return None
            tc._check_heads(name, f.heads if f.HasField("heads") else None, sel)
            m, n = sel.sub_shape(tc.shapes[name])
            r = tc.factor_rank(name, plan, True, side, b, m, n)
            want_left, want_right = side in (None, "right"), side in (None, "left")
            if f.rank != r or f.HasField("left") != want_left or f.HasField("right") != want_right:
                return None
            bits = tc._bits(True, False, name)
            if not bits:
                return None
            left = col.tensor(f.left, r, m, bits) if want_left else -1
            right = col.tensor(f.right, r, n, bits) if want_right else -1
            if left is None or right is None:
                return None
            pending.append((name, sel, side, b, (left, r, m), (right, r, n)))
        for d in dense:
            name = d.name
            if d.HasField("sparse") or not d.HasField("value") or name not in tc.shapes or name in seen:
                return None
            seen.add(name)
            sel, kind, _, _ = tc._layout(name, plan, True)
            if kind != "dense" or not plan.send_dense:
                return None
            tc._check_heads(name, d.heads if d.HasField("heads") else None, sel)
            sub = sel.sub_shape(tc.shapes[name])
            bits = tc._bits(True, True)
            if not bits:
                return None
            rows, cols = (1, int(np.prod(sub, dtype=np.int64))) if len(sub) < 2 else sub
            at = col.tensor(d.value, rows, cols, bits)
            if at is None:
                return None
            pending.append((name, sel, None, None, (at, sub), None))
    except UpdateDecodeError:
        return None
    if not pending:
        return None
    buf = col.run(kernel)
    if buf is None:
        return None
    out = DecodedTensors()
    for name, sel, side, b, first, second in pending:
        if second is None:                       # dense
            at, sub = first
            out.parts[name] = Part(sel=sel, value=buf[at:at + math.prod(sub)].view(sub))
            continue
        (la, r, m), (ra, _, n) = first, second
        left = buf[la:la + r * m].view(r, m) if la >= 0 else None
        right = buf[ra:ra + r * n].view(r, n) if ra >= 0 else None
        out.parts[name] = Part(sel=sel, side=side, basis=b, left=left, right=right)
    return out

