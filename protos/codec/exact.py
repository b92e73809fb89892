"""An exact, order-independent sum of weighted updates.

Float addition is not associative: summing client updates in arrival order could change
the last bit of the mean, so a coordinator that accumulates updates as they arrive would
depend on network timing. Here each weighted term ``w * x`` (float64) is cut into two
signed 64-bit integer limbs on a fixed grid of 2**-GRID_BITS and the limbs are summed as
integers: integer addition is exact, so the sum is the same bits whatever the order, and
a term can be taken out again exactly (a refused update). The grid keeps about 12 more
significant bits than float32 for terms of ordinary size; the part of a term below the
grid is dropped (the same for every party and every order).

Bounds: |w * x| < 2**MAX_TERM_BITS per element (the caller bounds weights and values),
and at most 2**22 terms per sum; :meth:`ExactSum.add` refuses a term past the bound.

:meth:`ExactSum.add_scaled` is the coordinator's path: a float32 tensor times an integer
weight, checked against the bound on the float32 tensor first, then summed in one pass.
The compiled path adds each term whole on the grid, trunc(w x 2**40), into the low limbs
while they have room for it (below 2**62 in magnitude; a term past int64's grid is split
as :meth:`limbs` splits it) and folds the low limbs into the high ones when they have not,
so most terms touch one int64 per element, not two. The limbs then split the sum another
way than per-term splits would, but the sum hi * 2**40 + lo is the same integer, and
:meth:`ExactSum.value` rounds that integer, not its limbs. The numpy path (no numba)
splits each term as :meth:`limbs` does. The high limbs of a parameter exist only once a
term or a fold needed them.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

GRID_BITS = 40                 # the grid: multiples of 2**-40
LIMB_BITS = 40                 # the low limb holds 40 bits, the high limb the rest
MAX_TERM_BITS = 32             # |w * x| < 2**32: high limb < 2**32, sums of 2**22 terms fit int64
_SCALE = 2.0 ** GRID_BITS
_LIMB = 2.0 ** LIMB_BITS
_MAX = 2.0 ** (MAX_TERM_BITS + GRID_BITS)
# Chunk of the split (elements). The split runs in numpy: per chunk one ufunc call
# multiplies in float64 and truncates into an int64 scratch (casting in its own small
# buffers) and a second adds it in (plus three small ones to find and split the terms
# >= 1, see _split_high); the calls release the GIL for their whole length. The scratch
# (1 MiB per int64 buffer) stays in L2 while the accumulator streams past: 2**16-2**17
# measured best, 2**19 twice as slow. The torch form it replaces needed three calls per
# chunk and a float64 chunk that at 2**20 page-faulted on every call (~17 ms for a
# 2**20-element parameter against ~2 ms here); chunks of 32,000 cost less CPU but, at
# ~5,000 calls per update, held the GIL against the gRPC loop.
_CHUNK = 1 << 17
_FITS_INT64 = 2.0 ** (62 - GRID_BITS)   # |w x| below this: w x on the grid fits an int64 (with room)
_LIMB_INT = 1 << LIMB_BITS
# The low limbs of a parameter are kept at most this in magnitude (int64 holds 2**63 - 1):
# a term is added whole on the grid into them while they have room for it, and they are
# folded into the high limbs (|lo| < 2**40 after) when they have not. After a fold there
# is room for any term the grid fits in int64 (< 2**62), so one fold always suffices.
_ROOM = 2.0 ** 63 - 2.0 ** 41
MAX_WEIGHT = 1 << 29           # float32 (24-bit significand) x weight < 2**53: exact in float64


def _runs(idx: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start in the full axis, start in the selection, length) of each run of consecutive
    indices in the sorted ``idx`` (a head owns a block of consecutive rows or columns)."""
    i = idx.numpy()
    breaks = (np.flatnonzero(np.diff(i) != 1) + 1).tolist()
    starts, ends = [0, *breaks], [*breaks, len(i)]
    return [(int(i[a]), a, b - a) for a, b in zip(starts, ends)]


def _carry(hi: torch.Tensor, lo: torch.Tensor) -> None:
    """In place: all but the low 40 bits of each low limb moved into its high limb (the
    same sum hi * 2**40 + lo); afterwards 0 <= lo < 2**40."""
    hi.add_(lo >> LIMB_BITS)                  # floor(lo / 2**40)
    lo.bitwise_and_(_LIMB_INT - 1)


# ---- compiled kernels ------------------------------------------------------------------------
# With numba installed (a dependency of fedmla) add_scaled runs one compiled call per
# parameter: a bound-check scan, then the sum into the low limbs (see the module
# docstring), no scratch, the GIL released throughout; the same integer sum as the numpy
# chunks below (which stay as the path without numba and as the tests' second opinion).
# ``FEDMLA_EXACT_KERNELS=numpy`` forces the numpy path.


@functools.cache
def _kernels():
    """The compiled kernels (compiled on first use, or loaded from numba's on-disk cache),
    or None when numba is missing or the numpy path is asked for."""
    if os.environ.get("FEDMLA_EXACT_KERNELS", "numba") == "numpy":
        return None
    try:
        import numba
    except ImportError:
        return None
    jit = numba.njit(nogil=True, cache=True, boundscheck=False)
    limb = float(_LIMB)
    max_term = 2.0 ** MAX_TERM_BITS
    fits = _FITS_INT64

    @jit
    def add_grid(x, lo, runs, x_stride, acc_stride, wg, sgn):
        """|w x| < 2**22: lo += sgn * trunc(w x 2**40) (``wg`` = w 2**40), the whole grid
        value in the low limb (it fits int64; the caller keeps room for it there)."""
        for t in range(runs.shape[0]):
            xo, ao, nr, nc = runs[t, 0], runs[t, 1], runs[t, 2], runs[t, 3]
            for i in range(nr):
                xr = x[xo + i * x_stride: xo + i * x_stride + nc]
                lr = lo[ao + i * acc_stride: ao + i * acc_stride + nc]
                for j in range(nc):
                    lr[j] += sgn * np.int64(np.float64(xr[j]) * wg)

    @jit
    def add_large(x, lo, hi, runs, x_stride, acc_stride, w, sgn):
        """Terms past int64's grid: hi = trunc(w x), lo = trunc((w x - hi) 2**40)."""
        for t in range(runs.shape[0]):
            xo, ao, nr, nc = runs[t, 0], runs[t, 1], runs[t, 2], runs[t, 3]
            for i in range(nr):
                xr = x[xo + i * x_stride: xo + i * x_stride + nc]
                lr = lo[ao + i * acc_stride: ao + i * acc_stride + nc]
                hr = hi[ao + i * acc_stride: ao + i * acc_stride + nc]
                for j in range(nc):
                    y = np.float64(xr[j]) * w
                    h = np.int64(y)
                    lr[j] += sgn * np.int64((y - np.float64(h)) * limb)
                    hr[j] += sgn * h

    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "contract"})
    def scan(x, xbits):
        """(bits of the largest |x| (NaN above 0x7f800000), float64 sum of x**2) of a float32
        vector, one vector pass. The sum's order is the compiled loop's (reassociated for
        vector lanes): the same for every call on one machine, not across machines."""
        m = np.uint32(0)
        s = 0.0
        for i in range(x.size):
            m = max(m, xbits[i] & 0x7fffffff)
            v = np.float64(x[i])
            s += v * v
        return m, s

    @jit
    def add_checked(x, xbits, lo, hi, runs, x_stride, acc_stride, w, sgn, room):
        """Check the bound of w * x, then add (sgn 1) or take out (-1) its grid values: one
        call per tensor. Returns (status, sum of x**2, bound): status 0 added, ``bound`` the
        most it moved a low limb by; -1 refused (NaN, infinite or |w x| >= 2**MAX_TERM_BITS;
        nothing added); 1 nothing added because ``lo`` (or, for terms past int64's grid
        (status 2), ``lo`` and ``hi``) is empty: the caller makes them and calls again; 3
        nothing added because the low limbs have less than ``room`` left: the caller folds
        them into the high limbs and calls again."""
        m, sumsq = scan(x, xbits)
        if m > 0x7f800000:
            return -1, sumsq, 0.0
        bits = np.empty(1, dtype=np.uint32)
        bits[0] = m
        top = np.float64(bits.view(np.float32)[0]) * w        # exact: 24 + 29 bits
        if not top < max_term:
            return -1, sumsq, 0.0
        if top < fits:
            if lo.size == 0:
                return 1, sumsq, 0.0
            bound = top * limb                                  # |trunc(w x 2**40)| <= this
            if bound > room:
                return 3, sumsq, 0.0
            add_grid(x, lo, runs, x_stride, acc_stride, w * limb, sgn)
            return 0, sumsq, bound
        if lo.size == 0 or hi.size == 0:
            return 2, sumsq, 0.0
        if limb > room:
            return 3, sumsq, 0.0
        add_large(x, lo, hi, runs, x_stride, acc_stride, w, sgn)
        return 0, sumsq, limb

    return add_checked


def warm_up() -> bool:
    """Compile (or load from numba's cache) the kernels now, outside any measured or
    latency-bound path; True when the compiled path is in use."""
    add_checked = _kernels()
    if add_checked is None:
        return False
    runs = np.array([[0, 0, 1, 2]], dtype=np.int64)
    for x in (np.zeros(2, dtype=np.float32), np.full(2, 3.0, dtype=np.float32)):
        add_checked(x, x.view(np.uint32), np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int64), runs, 2, 2,
                    1.0, 1, _ROOM)
    return True


_EMPTY = np.zeros(0, dtype=np.int64)       # an accumulator add_checked is to ask for


def _kernel_runs(x_shape: tuple[int, ...], shape: tuple[int, ...], rows: torch.Tensor | None,
                 cols: torch.Tensor | None) -> tuple[np.ndarray, int, int]:
    """(runs, x row stride, accumulator row stride) of add_terms for a term of ``x_shape``
    on parameter ``shape``, whole or on a selection of rows or columns."""
    if rows is not None:
        n = shape[1]
        runs = [(r * n, a * n, 1, length * n) for a, r, length in _runs(rows)]
        return np.array(runs, dtype=np.int64).reshape(-1, 4), n, n
    if cols is not None:
        runs = [(c, a, shape[0], length) for a, c, length in _runs(cols)]
        return np.array(runs, dtype=np.int64).reshape(-1, 4), x_shape[1], shape[1]
    n = int(np.prod(shape, dtype=np.int64))
    return np.array([[0, 0, 1, n]], dtype=np.int64), n, n



def _blocks(x: np.ndarray, lo: np.ndarray, hi: np.ndarray | None, rows: torch.Tensor | None,
            cols: torch.Tensor | None):
    """(x block, lo block, hi block or None) views of at most _CHUNK elements covering x
    and the accumulator entries it adds to: flat chunks, or for a column selection 2-D
    blocks of whole rows of one run of columns."""
    if cols is None:
        xf, lf, hf = x.reshape(-1), lo.reshape(-1), None if hi is None else hi.reshape(-1)
        if rows is None:
            spans = [(0, 0, xf.size)]
        else:
            n = x.shape[1]
            spans = [(a * n, r * n, length * n) for a, r, length in _runs(rows)]
        for full, sub, length in spans:
            for s in range(0, length, _CHUNK):
                e = min(length, s + _CHUNK)
                yield (xf[sub + s:sub + e], lf[full + s:full + e],
                       None if hf is None else hf[full + s:full + e])
        return
    m = x.shape[0]
    for a, c, length in _runs(cols):
        step = max(1, _CHUNK // length)
        for s in range(0, m, step):
            e = min(m, s + step)
            yield (x[s:e, c:c + length], lo[s:e, a:a + length],
                   None if hi is None else hi[s:e, a:a + length])


def _scatter(x: torch.Tensor, shape: tuple[int, ...], rows: torch.Tensor | None, cols: torch.Tensor | None
             ) -> torch.Tensor:
    out = torch.zeros(shape, dtype=x.dtype)
    if rows is not None:
        out.index_copy_(0, rows, x)
    else:
        out.index_copy_(1, cols, x)
    return out


def _refuse() -> OverflowError:
    return OverflowError(f"a weighted value reaches 2**{MAX_TERM_BITS} in magnitude (or is not "
                         f"finite): too large to sum exactly")


class ExactSum:
    """Exact sums of float64 tensors of fixed shapes, as int64 limbs (hi, lo)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self._hi: dict[str, torch.Tensor] = {}
        self._lo: dict[str, torch.Tensor] = {}
        self._bound: dict[str, float] = {}     # at least the largest |low limb| of each parameter
        self._runs: dict[str, tuple] = {}

    @staticmethod
    def limbs(term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hi, lo) int64 limbs of ``term`` on the grid, both truncated toward zero: a term
        is hi * 2**40 + lo grid steps, |lo| < 2**40."""
        a = term.to(torch.float64) * _SCALE              # a power of two: exact
        if a.numel():
            low, high = torch.aminmax(a)
            if not (-_MAX < float(low) and float(high) < _MAX):      # NaN fails both
                raise _refuse()
        hi = (a * (1.0 / _LIMB)).to(torch.int64)         # exact quotient, truncated toward zero
        a.sub_(hi.to(torch.float64).mul_(_LIMB))         # |a - hi*2^40| < 2^40: exact
        lo = a.to(torch.int64)                           # drops the sub-grid bits
        return hi, lo

    def add(self, name: str, term: torch.Tensor, sign: int = 1) -> None:
        """Add (``sign`` = 1) or take out (-1) one term of parameter ``name``."""
        if tuple(term.shape) != self.shapes[name]:
            raise ValueError(f"{name}: term of shape {tuple(term.shape)}, expected {self.shapes[name]}")
        hi, lo = self.limbs(term)
        self.add_limbs(name, hi, lo, sign)

    def _acc(self, store: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        acc = store.get(name)
        if acc is None:
            acc = store[name] = torch.zeros(self.shapes[name], dtype=torch.int64)
        return acc

    def add_limbs(self, name: str, hi: torch.Tensor, lo: torch.Tensor, sign: int = 1) -> None:
        """Add limbs made by :meth:`limbs` (so that the costly split can run outside a lock)."""
        self._reserve(name, _LIMB)
        lo_acc = self._acc(self._lo, name)
        hi_acc = self._acc(self._hi, name)
        if sign > 0:
            hi_acc.add_(hi)
            lo_acc.add_(lo)
        else:
            hi_acc.sub_(hi)
            lo_acc.sub_(lo)

    def add_scaled(self, name: str, x: torch.Tensor, weight: int, sign: int = 1,
                   rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> float:
        """Add (``sign`` = 1) or take out (-1) the term ``weight * x`` of parameter ``name``:
        ``x`` float32, ``weight`` an integer in [1, MAX_WEIGHT). The same integer sum as
        ``add(name, x.double() * weight, sign)`` (the product is exact in float64; the
        limbs may split it differently, see :meth:`sum_limbs`). A term past the bound (or not finite) is
        refused before anything is summed. Not thread-safe for one ``name``: callers
        serialise the calls of a parameter (not of different parameters).

        ``rows`` (or ``cols``): sorted, distinct indices of a 2-D parameter; ``x`` is then
        the term's sub-matrix on those rows (columns) and the term is 0 elsewhere: the same
        limbs as adding the full-shape term, without touching the zeros (a zero adds nothing).

        Returns the float64 sum of ``x**2`` (for the update's norm; the compiled path sums it
        in its vector lanes' order, so its last bits can differ from the numpy path's)."""
        shape = self.shapes[name]
        if rows is not None and cols is not None:
            raise ValueError(f"{name}: a selection of rows or of columns, not both")
        if rows is not None or cols is not None:
            full = list(shape)
            if rows is not None:
                full[0] = rows.numel()
            else:
                full[1] = cols.numel()
            if len(shape) != 2 or tuple(x.shape) != tuple(full):
                raise ValueError(f"{name}: term of shape {tuple(x.shape)}, expected {tuple(full)} "
                                 f"(a selection of {shape})")
        elif tuple(x.shape) != shape:
            raise ValueError(f"{name}: term of shape {tuple(x.shape)}, expected {shape}")
        weight = int(weight)
        if x.dtype != torch.float32 or not 0 < weight < MAX_WEIGHT:
            if rows is not None or cols is not None:
                x = _scatter(x, shape, rows, cols)
            self.add(name, x.to(torch.float64) * weight, sign)
            return float(x.detach().to(torch.float64).square().sum())
        x = x.detach().contiguous()
        if not x.numel():
            self._acc(self._lo, name)
            return 0.0
        # The bounds hold for the full term iff they hold for x: its zeros are within both
        # and never raise the largest |w x|.
        add_checked = _kernels()
        if add_checked is not None:
            xn = x.numpy().reshape(-1)
            # the runs of a selection, kept while the same index tensor comes back (a round's
            # selections are one object per parameter)
            sel = rows if rows is not None else cols
            hit = self._runs.get(name)
            if hit is None or hit[0] is not sel or hit[1] != (rows is None):
                hit = self._runs[name] = (sel, rows is None, _kernel_runs(tuple(x.shape), shape, rows, cols))
            runs, xs, accs = hit[2]
            sgn = 1 if sign > 0 else -1
            while True:
                lo, hi = self._lo.get(name), self._hi.get(name)
                status, sumsq, moved = add_checked(
                    xn, xn.view(np.uint32), _EMPTY if lo is None else lo.numpy().reshape(-1),
                    _EMPTY if hi is None else hi.numpy().reshape(-1), runs, xs, accs, float(weight), sgn,
                    _ROOM - self._bound.get(name, 0.0))
                if status == 0:
                    self._bound[name] = self._bound.get(name, 0.0) + moved
                    return sumsq
                if status < 0:
                    raise _refuse()
                if status == 3:
                    self._fold(name)
                    continue
                self._acc(self._lo, name)      # accepted, but an accumulator it needs is missing
                if status == 2:
                    self._acc(self._hi, name)
        low, high = (float(v) for v in torch.aminmax(x))
        # float32 times an integer below 2**29 is exact in a Python float: the same test as
        # limbs() makes on the float64 term, |w * x| < 2**MAX_TERM_BITS (NaN fails both).
        bound = 2.0 ** MAX_TERM_BITS
        if not (-bound < low * weight and high * weight < bound):
            raise _refuse()
        top = max(-low, high) * weight
        small = top < 1.0              # every |w * x| < 1: all high limbs are 0
        self._reserve(name, _LIMB)     # every low limb this path adds is below 2**40
        lo_acc = self._acc(self._lo, name).numpy()
        hi_acc = None if small else self._acc(self._hi, name).numpy()
        # the largest block: _CHUNK elements, or one row of a run of selected columns
        c = min(x.numel(), _CHUNK if cols is None else max(_CHUNK, x.shape[1]))
        k = np.empty(c, dtype=np.int64)
        h = None if small else np.empty(c, dtype=np.int64)
        add = np.add if sign > 0 else np.subtract
        # float64 scalars: numpy multiplies float32 by them in float64, where w * x (* 2**40)
        # is exact (24 + 29 significant bits, times a power of two)
        w, w_grid = np.float64(weight), np.float64(weight * _SCALE)
        for xc, lo_c, hi_c in _blocks(x.numpy(), lo_acc, hi_acc, rows, cols):
            kc = k[:xc.size].reshape(xc.shape)
            # the cast truncates toward zero: the grid steps of w * x while they fit int64
            if small:
                np.multiply(xc, w_grid, out=kc, casting="unsafe")           # = lo
            elif top < _FITS_INT64:
                np.multiply(xc, w_grid, out=kc, casting="unsafe")           # hi * 2**40 + lo
                self._split_high(hi_c, kc, h[:xc.size].reshape(xc.shape), add)
            else:
                self._split_large(xc, w, hi_c, h[:xc.size].reshape(xc.shape), kc, add)
            add(lo_c, kc, out=lo_c)
        return float(x.to(torch.float64).square().sum())

    @staticmethod
    def _split_high(hi_acc: np.ndarray, kc: np.ndarray, hc: np.ndarray, add) -> None:
        """Split ``kc`` = trunc(V), V = w * x * 2**40 (|V| < 2**62), in place into its low
        limbs, summing the high limbs hi = trunc(kc / 2**40) = trunc(w * x) into ``hi_acc``;
        lo = kc - hi * 2**40: the same limbs as :meth:`limbs`. ``hc``: int64 scratch.

        Terms >= 1 are usually few, so only the entries with |kc| >= 2**40 are looked at
        (one integer pass finds them) and ``hi_acc`` is touched there only; when they are
        many (>= 1/8) the chunk is split with whole-array integer ops."""
        np.add(kc, _LIMB_INT - 1, out=hc)                     # |kc| >= 2**40 <=> this, as
        big = np.greater(hc.view(np.uint64), 2 * _LIMB_INT - 2)   # unsigned, > 2**41 - 2
        idx = big.nonzero()
        count = idx[0].size
        if not count:
            return
        if count * 8 < kc.size:
            kv = kc[idx]
            hv = (kv + ((kv >> 63) & (_LIMB_INT - 1))) >> LIMB_BITS     # trunc(kv / 2**40)
            kc[idx] = kv - hv * _LIMB_INT
            hi_acc[idx] = add(hi_acc[idx], hv)
            return
        np.right_shift(kc, 63, out=hc)                        # -1 where negative, else 0
        np.bitwise_and(hc, _LIMB_INT - 1, out=hc)
        np.add(hc, kc, out=hc)
        np.right_shift(hc, LIMB_BITS, out=hc)                 # floor((kc + bias) / 2**40) = trunc(kc / 2**40)
        add(hi_acc, hc, out=hi_acc)
        np.multiply(hc, _LIMB_INT, out=hc)
        np.subtract(kc, hc, out=kc)

    @staticmethod
    def _split_large(xc: np.ndarray, w: np.float64, hi_acc: np.ndarray, hc: np.ndarray, kc: np.ndarray, add) -> None:
        """The split as :meth:`limbs` makes it, for terms past int64's grid (|w x| >= 2**23):
        hi = trunc(w x) summed into ``hi_acc``, the low limb left in ``kc``."""
        y = np.multiply(xc, w)                           # exact: w * x, float64
        np.copyto(hc, y, casting="unsafe")               # hi = trunc(w * x)
        add(hi_acc, hc, out=hi_acc)
        np.subtract(y, hc, out=y)                        # w * x - hi: exact (|hi| < 2**32)
        np.multiply(y, _SCALE, out=kc, casting="unsafe")     # lo: truncated toward zero to the grid

    def _reserve(self, name: str, bound: float) -> None:
        """Make room in the low limbs of ``name`` for a term that moves them by at most ``bound``."""
        if self._bound.get(name, 0.0) + bound > _ROOM:
            self._fold(name)
        self._bound[name] = self._bound.get(name, 0.0) + bound

    def _fold(self, name: str) -> None:
        """Move all but the low 40 bits of each low limb into the high limb (the same sum):
        afterwards 0 <= lo < 2**40."""
        _carry(self._acc(self._hi, name), self._acc(self._lo, name))
        self._bound[name] = _LIMB

    def sum_limbs(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(hi, lo) of the sum of ``name`` with 0 <= lo < 2**40 (new tensors): one pair per
        sum, whatever terms and order made it (the sum is hi * 2**40 + lo grid steps)."""
        lo = self._lo.get(name)
        hi = self._hi.get(name)
        lo = torch.zeros(self.shapes[name], dtype=torch.int64) if lo is None else lo.clone()
        hi = torch.zeros(self.shapes[name], dtype=torch.int64) if hi is None else hi.clone()
        _carry(hi, lo)
        return hi, lo

    def value(self, name: str) -> torch.Tensor:
        """The sum of parameter ``name`` as float64 (zeros if nothing was added): a
        function of the integer sum only, so of the set of terms, not their order nor how
        the limbs split it: hi * 2**40 + lo rounded once to float64 (both exact in float64
        while |lo| < 2**53), then scaled by 2**-40."""
        lo = self._lo.get(name)
        if lo is None:
            return torch.zeros(self.shapes[name], dtype=torch.float64)
        hi = self._hi.get(name)
        if self._bound.get(name, 0.0) >= 2.0 ** 53:
            hi, lo = self.sum_limbs(name)
        if hi is None:          # high limbs all zero: 0.0 * 2**40 + lo is lo, bit for bit
            return lo.to(torch.float64) / _SCALE
        return (hi.to(torch.float64) * _LIMB + lo.to(torch.float64)) / _SCALE
