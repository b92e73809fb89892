"""The coordinator's decode of an update's quantised tensors in one compiled pass.

:meth:`TensorCodec.decode <.wire.TensorCodec.decode>` decodes the ~160 tensors of an
update one by one: per tensor ~15 numpy / torch calls on small arrays, ~9 ms of Python per
update on the small preset, all of it holding the GIL against the other ingest thread and
the gRPC loop. Here everything that follows from the round's plan alone is worked out once
per plan (:class:`PlanTable`), the per-tensor Python is only reading the message's fields
and comparing them with it, and the packed codes of every tensor are then unpacked,
range-checked, dequantised and checked finite by one compiled call that releases the GIL.

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
import zlib

import numpy as np
import torch

from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import MAX_INFLATED_BYTES, inflate_exact

from .layout import RoundPlan
from .quant import _shift, code_range, container_bits
from .wire import DecodedTensors, Part, TensorCodec

_ALIGN = 16                    # float32 elements: 64 bytes, torch's CPU alignment
# container bits -> (scheme, dtype, bytes per row of C codes)
_CONTAINER = {
    8: (pb.Quantization.INT8_ROW, pb.INT8, lambda c: c),
    4: (pb.Quantization.INT4_ROW, pb.INT4, lambda c: (c + 1) // 2),
    2: (pb.Quantization.INT2_ROW, pb.INT2, lambda c: (c + 3) // 4),
}
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


class PlanTable:
    """Everything the fast path needs of one round's plan, worked out once per plan.

    Per tensor name the plan fixes the selection, the layout (side, effective basis), the
    rank, the bit width, the shapes and byte sizes a well-formed tensor must have, and where
    its values go in the output buffer. Each update used to recompute all of it: the GIL-held
    Python of a decode went from ~2.3 ms to ~0.9 ms per update on the small preset with this
    table (the compiled pass and the inflates, ~1 ms each, release the GIL).

    A table answers for the plan object it was built from as long as that plan still says
    what it said (:meth:`current`: the same round, mask object and mask version, shared
    state and bases); the plan is kept alive here, so its identity cannot be reused.
    ``expected`` is :meth:`TensorCodec.expected` of the plan (the coordinator's check for
    missing tensors); ``lowrank`` / ``dense`` map the names this path takes to their
    entries (absent: the path steps aside for that name, and the per-tensor decoder decides):

    - low-rank: (selection, side, basis, rank, heads, left spec | None, right spec | None),
      a spec None for a factor the layout does not send;
    - dense: (selection, heads, spec);

    ``heads`` the list a well-formed entry carries ([] for none). A spec describes one
    packed tensor: (slot, scheme, dtype, [rows, cols], code bytes, [rows], float16 scale
    bytes, float32 scale bytes, view) with ``slot`` its row of :attr:`meta` and ``view``
    its place among the output views.
    """

    def __init__(self, tc: TensorCodec, plan: RoundPlan):
        self.plan, self.round, self.send_dense = plan, plan.round, plan.send_dense
        self.mask = plan.mask
        self.version = plan.mask._version if plan.mask is not None else -1
        self.shared, self.bases = plan.shared, plan.shared.bases
        self.expected = tc.expected(plan, uplink=True)
        self.lowrank: dict[str, tuple] = {}
        self.dense: dict[str, tuple] = {}
        used = []                                   # (name, Basis, matrix, side) the layout read
        wants = []                                  # (rows, cols, bits, view shape) per packed tensor
        entries = []                                # (name, entry with indices into wants)

        def want(rows: int, cols: int, bits: int, shape: tuple[int, ...]) -> int:
            wants.append((rows, cols, bits, tuple(shape)))
            return len(wants) - 1

        # the encoder's order: factors by name, then dense tensors by name (a top-k run sends
        # sparse entries, which this path leaves to the per-tensor decoder: no entries)
        layouts = {} if tc.cfg.sparse(True) else {name: tc._layout(name, plan, True) for name in self.expected}
        for name in sorted(layouts, key=lambda name: (layouts[name][1] != "lowrank", name)):
            sel, kind, side, b = layouts[name]
            if side is not None:
                basis = plan.shared.bases[name]
                used.append((name, basis, basis.matrix, basis.side))
            if sel.heads is not None and not sel.heads:
                continue          # no head of the layer active: the per-tensor decoder refuses any entry
            sub = sel.sub_shape(tc.shapes[name])
            if kind == "lowrank":
                bits = tc._bits(True, False, name)
                if not bits:
                    continue
                m, n = sub
                r = tc.factor_rank(name, plan, True, side, b, m, n)
                left = want(r, m, bits, (r, m)) if side in (None, "right") else None
                right = want(r, n, bits, (r, n)) if side in (None, "left") else None
                entries.append((name, (sel, side, b, r, sel.heads or [], left, right)))
            elif kind == "dense" and len(sub) <= 2:
                bits = tc._bits(True, True)
                if not bits:
                    continue
                rows, cols = (1, math.prod(sub)) if len(sub) < 2 else sub
                entries.append((name, (sel, sel.heads or [], want(rows, cols, bits, sub))))
        self.basis_check = tuple(used)
        # The output buffer holds the tensors of one view shape side by side, each at a
        # 64-byte aligned place (as torch aligns a fresh tensor: the low-rank products, MKL
        # matmuls, keep their bits), so that one as_strided + unbind per shape makes all
        # their views (one call per tensor was ~0.25 ms per update); ``views``: (shape,
        # strides, offset) of each shape's stack, ``view_of``: a tensor's place among the
        # unbound views.
        by_shape: dict[tuple, list[int]] = {}
        for i, w in enumerate(wants):
            by_shape.setdefault(w[3], []).append(i)
        out_at, view_of, self.views = [0] * len(wants), [0] * len(wants), []
        size = placed = 0
        for shape, members in by_shape.items():
            step = -(-math.prod(shape) // _ALIGN) * _ALIGN
            strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
            self.views.append(((len(members), *shape), (step, *strides), size))
            for j, i in enumerate(members):
                out_at[i], view_of[i] = size + j * step, placed + j
            size += len(members) * step
            placed += len(members)
        self.out_size = size
        specs = []
        for i, (rows, cols, bits, _) in enumerate(wants):
            scheme, dtype, row_bytes_of = _CONTAINER[container_bits(bits)]
            specs.append((i, scheme, dtype, [rows, cols], rows * row_bytes_of(cols), [rows], 2 * rows, 4 * rows,
                          view_of[i]))
        for name, e in entries:
            if len(e) == 3:
                self.dense[name] = (e[0], e[1], specs[e[2]])
            else:
                self.lowrank[name] = (*e[:5], *(specs[i] if i is not None else None for i in e[5:]))
        # meta rows of every packed tensor in this (the encoder's) order, with code and
        # scale offsets for an update sent in this order with scales of one dtype
        self.meta = np.zeros((len(wants), _META), dtype=np.int64)
        code_at = scale_at = 0
        for i, (rows, cols, bits, _) in enumerate(wants):
            lo, hi = code_range(bits)
            self.meta[i] = (code_at, rows, cols, container_bits(bits), out_at[i], lo, hi, scale_at,
                            1 if _shift(bits) else 0)
            code_at += specs[i][4]
            scale_at += rows
        self.code_bytes = np.array([spec[4] for spec in specs], dtype=np.int64)
        self.rows = np.ascontiguousarray(self.meta[:, 1])
        self.order = list(range(len(wants)))

    def current(self, plan: RoundPlan) -> bool:
        """Whether this table still describes ``plan`` (a mask or basis changed in place, or
        another plan object, make a new one)."""
        mask = plan.mask
        return (self.plan is plan and self.mask is mask and self.round == plan.round
                and self.send_dense == plan.send_dense and self.shared is plan.shared
                and self.bases is plan.shared.bases
                and self.version == (mask._version if mask is not None else -1)
                and all(self.bases.get(n) is basis and basis.matrix is matrix and basis.side == side
                        for n, basis, matrix, side in self.basis_check))


def plan_table(tc: TensorCodec, plan: RoundPlan) -> PlanTable:
    """``tc``'s table for ``plan``: the one of the last plan seen when it still applies,
    else a new one (a round's updates all share one plan, so it is built once per round)."""
    table = tc._plan_table
    if table is None or not table.current(plan):
        table = tc._plan_table = PlanTable(tc, plan)
    return table


def decode_tensors(tc: TensorCodec, factors, dense, plan: RoundPlan) -> DecodedTensors | None:
    """An uplink update's tensors, as ``tc.decode(factors, dense, plan, uplink=True)`` gives
    them, or None when this path does not take the update (the caller then runs
    ``tc.decode``, which gives them or refuses with its own error)."""
    kernel = _kernel()
    if kernel is None or tc.cfg.sparse(True):
        return None
    table = plan_table(tc, plan)
    lowrank, dense_of = table.lowrank, table.dense
    if len(factors) > len(lowrank) or len(dense) > len(dense_of):
        return None                                 # unknown or repeated names among them
    names, entries, queued = [], [], []              # queued: (Tensor message, slot)
    for f in factors:
        name = f.name
        e = lowrank.get(name)
        if e is None or f.rank != e[3]:
            return None
        heads = f.heads.heads
        if len(heads) != len(e[4]) or (e[4] and list(heads) != e[4]):
            return None
        # a wanted factor is checked present below (its quantisation scheme is not the
        # default); an unwanted one must be absent
        if e[5] is None:
            if f.HasField("left"):
                return None
        else:
            queued.append((f.left, e[5]))
        if e[6] is None:
            if f.HasField("right"):
                return None
        else:
            queued.append((f.right, e[6]))
        names.append(name)
        entries.append(e)
    for d in dense:
        name = d.name
        e = dense_of.get(name)
        if e is None or d.HasField("sparse"):
            return None
        heads = d.heads.heads
        if len(heads) != len(e[1]) or (e[1] and list(heads) != e[1]):
            return None
        queued.append((d.value, e[2]))           # a value is present iff its scheme is set
        names.append(name)
        entries.append(e)
    if not names or len(set(names)) != len(names):
        return None
    order, codes, half, full, is_half = [], [], [], [], []
    for t, (index, scheme, dtype, shape, nbytes, srows, hbytes, fbytes, _) in queued:
        q = t.quant
        if q.scheme != scheme or t.dtype != dtype or t.shape != shape:
            return None
        data = t.data
        compression = t.compression
        if compression:
            if compression != pb.DEFLATE or nbytes > MAX_INFLATED_BYTES:
                return None
            try:
                data = inflate_exact(data, nbytes)       # bounded by the plan's size, as _payload
            except zlib.error:
                return None
            if data is None:
                return None
        elif len(data) != nbytes:
            return None
        sc = q.scales
        sdata = sc.data
        if sc.compression or sc.quant.scheme or sc.shape != srows:
            return None
        sdtype = sc.dtype
        if sdtype == pb.FLOAT16 and len(sdata) == hbytes:
            half.append(sdata)
            is_half.append(True)
        elif sdtype == pb.FLOAT32 and len(sdata) == fbytes:
            full.append(sdata)
            is_half.append(False)
        else:
            return None
        order.append(index)
        codes.append(data)
    buf = torch.empty(max(table.out_size, 1), dtype=torch.float32)
    if not _run(kernel, table, order, codes, half, full, is_half, buf):
        return None
    views = [v for shape, strides, at in table.views for v in buf.as_strided(shape, strides, at).unbind(0)]
    out = DecodedTensors()
    parts = out.parts
    for name, e in zip(names, entries):
        if len(e) == 3:                              # dense: (sel, heads, spec)
            parts[name] = Part(e[0], None, None, None, None, views[e[2][8]])
            continue
        sel, side, b, _, _, ls, rs = e
        parts[name] = Part(sel, side, b, views[ls[8]] if ls is not None else None,
                           views[rs[8]] if rs is not None else None)
    return out


def _run(kernel, table: PlanTable, order: list[int], codes: list[bytes], half: list[bytes], full: list[bytes],
         is_half: list[bool], buf: torch.Tensor) -> bool:
    """Dequantise the queued tensors (``order``: their table slots, in the message's order)
    into ``buf``; False when one is refused."""
    hs = np.frombuffer(b"".join(half), dtype="<f2").astype(np.float32)
    fs = np.frombuffer(b"".join(full), dtype="<f4")
    scales = np.concatenate([hs, fs])                # a fresh, writable float32 array
    if order == table.order and (not half or not full):
        meta = table.meta                            # the encoder's order, one scale dtype
    else:
        idx = np.array(order, dtype=np.intp)
        meta = table.meta[idx]
        sizes = table.code_bytes[idx]
        meta[:, 0] = np.cumsum(sizes) - sizes
        # float16 scales first, then float32, each in the message's order
        rows = table.rows[idx]
        h = np.array(is_half, dtype=bool)
        rh = np.where(h, rows, 0)
        rf = rows - rh
        meta[:, 7] = np.where(h, np.cumsum(rh) - rh, np.cumsum(rf) - rf + hs.size)
    return kernel(np.frombuffer(b"".join(codes), dtype=np.uint8), meta, scales, buf.numpy()) < 0
