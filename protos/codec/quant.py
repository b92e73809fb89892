"""Per-row quantisation of float tensors (int8, int4 or 2-bit), torch only.

This is the codec's own small quantiser; ``kernels/quant`` provides fused int8/int4
versions of :func:`quantize_rows` / :func:`dequantize_rows` for accelerators.

Levels per row i, with one scale s[i]:

- 8 / 4 / 3 bits: value = q * s, q in [-qmax, qmax] (qmax 127 / 7 / 3), a zero level.
  3 bits (seven levels) travel in the 4-bit container; with ``entropy_coding`` the
  unused codes cost nothing.
- 2 bits: value = (q + 1/2) * s, q in [-2, 1]: four levels +-s/2, +-3s/2 and no zero
  (a zero level would waste one of the four codes; for bell-shaped rows the four
  symmetric levels are close to the optimal 4-level quantiser).

Scales: ``fit=False`` takes the smallest scale that covers the row's largest magnitude
(8/4 bits: amax / qmax; 2 bits: amax / 2), so round-to-nearest errs by at most s/2 per
entry and stochastic rounding by less than s. ``fit=True`` then runs a few alternating
least-squares steps (assign levels, refit the scale), which can only lower the row's
squared error; entries beyond the outer level are clipped, so the per-entry bound no
longer holds, only the row's total error is smaller. Error feedback keeps the rest.

``half_scales=True`` rounds every scale to float16 before the levels are chosen (so the
receiver, which reads float16 scales, dequantises exactly what the sender assumed); rows
whose scale does not fit float16 keep float32 and the whole tensor is then sent float32.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from fedmla.protos.tensors import pack_codes_np

QMAX = {8: 127, 4: 7, 3: 3, 2: 2}
_FIT_STEPS = 4
_HALF_MAX = 60000.0


def code_range(bits: int) -> tuple[int, int]:
    """The integer codes a ``bits``-bit quantisation may use, (lowest, highest)."""
    return (-2, 1) if bits == 2 else (-QMAX[bits], QMAX[bits])


def _shift(bits: int) -> float:
    """Code q stands for (q + shift) times the row scale."""
    return 0.5 if bits == 2 else 0.0


def _levels(y: torch.Tensor, bits: int, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Integer codes for y = x / s (float32), as int8."""
    lo, hi = code_range(bits)
    z = y - _shift(bits)
    if stochastic:
        q = torch.floor(z + torch.rand(z.shape, generator=generator, dtype=torch.float32))
    else:
        q = torch.round(z)
    return q.clamp_(lo, hi).to(torch.int8)


def container_bits(bits: int) -> int:
    """The packed width a ``bits``-bit quantisation travels in (3-bit codes use 4-bit slots)."""
    return 4 if bits == 3 else bits


def level_values(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The multiple of the row scale each integer code stands for (float32)."""
    return q.float() + _shift(bits)


def quantize_rows(x: torch.Tensor, bits: int, stochastic: bool = False,
                  generator: torch.Generator | None = None, fit: bool = False,
                  half_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, C) float -> (q (R, C) int8, scales (R,) float32). See the module text."""
    if bits not in QMAX:
        raise ValueError(f"bits must be 8, 4, 3 or 2, got {bits}")
    if x.dim() != 2:
        raise ValueError(f"quantize_rows needs a 2-D tensor, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantise a tensor with non-finite values")
    xf = x.detach().float()
    if not xf.size(1):
        return torch.zeros(xf.shape, dtype=torch.int8), torch.zeros(xf.size(0))
    scales = xf.abs().amax(dim=1) / QMAX[bits]
    if fit:
        for _ in range(_FIT_STEPS):
            safe = torch.where(scales > 0, scales, torch.ones_like(scales))
            v = level_values(_levels(xf / safe[:, None], bits, False, None), bits)
            num, den = (xf * v).sum(dim=1), (v * v).sum(dim=1)
            refit = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), scales)
            scales = torch.where(refit > 0, refit, scales)
    if half_scales and bool((scales <= _HALF_MAX).all()):
        scales = scales.half().float()
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = _levels(xf / safe[:, None], bits, stochastic, generator)
    return q, scales.float()


def quantize_rows_np(x: np.ndarray, bits: int, half_scales: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_rows` with round-to-nearest and ``fit=False``, in numpy: x (R, C)
    float32 -> (q (R, C) int8, scales (R,) float32), the same bits.

    The same float32 steps in the same order (amax / qmax, the optional float16 round
    trip, x / s, minus the 2-bit shift, round half to even, clamp), each one correctly
    rounded IEEE arithmetic in both libraries. A client encodes ~40 small tensors per
    update, and torch's ~5-10 us per call was most of their cost (numpy's is ~1 us)."""
    if bits not in QMAX:
        raise ValueError(f"bits must be 8, 4, 3 or 2, got {bits}")
    if x.ndim != 2 or x.dtype != np.float32:
        raise ValueError(f"quantize_rows_np needs a 2-D float32 array, got {x.dtype} of shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("cannot quantise a tensor with non-finite values")
    if not x.shape[1]:
        return np.zeros(x.shape, np.int8), np.zeros(x.shape[0], np.float32)
    scales = np.abs(x).max(axis=1) / np.float32(QMAX[bits])
    if half_scales and bool((scales <= _HALF_MAX).all()):
        scales = scales.astype(np.float16).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    z = x / safe[:, None]
    if bits == 2:
        z -= np.float32(_shift(bits))
    lo, hi = code_range(bits)
    q = np.clip(np.rint(z, out=z), lo, hi, out=z).astype(np.int8)
    return q, scales


def scales_are_half_np(scales: np.ndarray) -> bool:
    """:func:`scales_are_half` of float32 numpy scales (a scale past float16's range is
    not: it becomes inf, quietly, as in torch)."""
    with np.errstate(over="ignore"):
        return bool((scales.astype(np.float16).astype(np.float32) == scales).all())


def quantize_pack_rows(x: np.ndarray, bits: int, half_scales: bool, deq: np.ndarray) -> tuple[bytes, np.ndarray, bool]:
    """Round-to-nearest quantisation of x (R, C) float32 (``fit=False``) straight to the wire:
    (the packed codes, as :func:`~fedmla.protos.tensors.pack_codes_np` lays them out in
    ``container_bits(bits)`` slots; the scales (R,) float32; whether they travel as
    float16), with the dequantised values written into ``deq`` (R, C) float32.

    Once :func:`warm_up` has loaded it, one compiled pass (~5 us for a (12, 64) factor);
    before, and without numba, :func:`quantize_rows_np` + :func:`dequantize_rows_into` +
    ``pack_codes_np`` + :func:`scales_are_half_np` (~30 us in ~25 numpy calls). The same
    bits either way (tests/codec/test_quant_encode_np.py)."""
    kernel = _compiled[0] if _compiled else None
    if kernel is None:
        q, scales = quantize_rows_np(x, bits, half_scales)
        dequantize_rows_into(q, scales, bits, deq)
        raw = pack_codes_np(q, container_bits(bits)) if q.size else b""
        return raw, scales, half_scales and scales_are_half_np(scales)
    if bits not in QMAX:
        raise ValueError(f"bits must be 8, 4, 3 or 2, got {bits}")
    if x.ndim != 2 or x.dtype != np.float32:
        raise ValueError(f"quantize_pack_rows needs a 2-D float32 array, got {x.dtype} of shape {x.shape}")
    lo, hi = code_range(bits)
    status, packed, scales = kernel(x, np.float32(QMAX[bits]), np.float32(_shift(bits)), lo, hi, container_bits(bits),
                                    half_scales, deq)
    if status < 0:
        raise ValueError("cannot quantise a tensor with non-finite values")
    return (packed.tobytes() if packed.size else b""), scales, bool(status)


# The compiled pass, once warm_up() loaded it. Not loaded on first use: importing numba and
# loading the pass cost ~0.75 s of CPU in a fresh process, what ~300 encodes of the tiny
# preset save, so a process that encodes often asks for it at its start (outside any round),
# and one that encodes a few times keeps the numpy steps.
_compiled: list = []


def warm_up() -> bool:
    """Load the compiled pass of :func:`quantize_pack_rows` for this process (compiled, or
    loaded from numba's on-disk cache); True when it is in use, False without numba or with
    ``FEDMLA_EXACT_KERNELS=numpy``."""
    if not _compiled:
        kernel = _pack_kernel()
        if kernel is None:
            return False
        _compiled.append(kernel)
        # numba compiles (or loads from its cache) on the first call, for the argument types
        # of that call: one call the way encoders make it loads what they will run
        quantize_pack_rows(np.ones((1, 2), np.float32), 3, True, np.empty((1, 2), np.float32))
    return True


def _pack_kernel():
    """The compiled pass of :func:`quantize_pack_rows`, or None without numba or with
    ``FEDMLA_EXACT_KERNELS=numpy``."""
    if os.environ.get("FEDMLA_EXACT_KERNELS", "numba") == "numpy":
        return None
    try:
        import numba
    except ImportError:
        return None
    half_max, half_overflow = np.float32(_HALF_MAX), np.float32(65520.0)

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def quantize_pack(x, qmax, shift, lo, hi, cbits, half_scales, deq):
        """(status, packed (R, row bytes) uint8, scales (R,) float32); status -1: a
        non-finite entry, else 1 when the scales travel as float16, 0 when as float32."""
        R, C = x.shape
        scales = np.empty(R, np.float32)
        fits = True
        for i in range(R):
            m = np.float32(0.0)
            for j in range(C):
                v = abs(x[i, j])
                if not np.isfinite(v):
                    return -1, np.empty((0, 0), np.uint8), scales
                if v > m:
                    m = v
            scales[i] = m / qmax
            fits &= scales[i] <= half_max
        half = half_scales
        if half_scales:
            for i in range(R):
                # the scale rounded to float16 (to nearest, ties to even) and back, as
                # numpy's astype pair: inf from 65520 on (float16's overflow), multiples of
                # 2**-24 below 2**-14 (its subnormals), 11 significant bits otherwise; every
                # step but the rint is an exact power-of-two scaling in float64
                s = scales[i]
                if s >= half_overflow:
                    r = np.float32(np.inf)
                else:
                    e = max(math.frexp(np.float64(s))[1], -13)          # s in [2**(e-1), 2**e)
                    r = np.float32(math.ldexp(np.rint(math.ldexp(np.float64(s), 11 - e)), e - 11))
                if fits:                # rounded (a float16 value rounds to itself: half stays true)
                    scales[i] = r
                else:                   # kept: float16 on the wire only if every one is exact
                    half &= r == s
        per = 8 // cbits
        packed = np.zeros((R, (C + per - 1) // per), np.uint8)
        for i in range(R):
            s = scales[i]
            safe = s if s > 0 else np.float32(1.0)
            for j in range(C):
                z = x[i, j] / safe
                if shift:
                    z -= shift
                z = min(max(np.rint(z), np.float32(lo)), np.float32(hi))
                q = np.int64(z)
                deq[i, j] = (np.float32(q) + shift) * s
                if cbits == 8:
                    packed[i, j] = np.uint8(q & 0xFF)
                elif cbits == 4:
                    packed[i, j >> 1] |= np.uint8((q & 0xF) << (4 * (j & 1)))
                else:
                    packed[i, j >> 2] |= np.uint8((q + 2) << (2 * (j & 3)))
        return np.int64(half), packed, scales

    return quantize_pack


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """(q (R, C) int8, scales (R,)) -> (R, C) float32."""
    return level_values(q, bits) * scales.float()[:, None]


def dequantize_rows_into(q: np.ndarray, scales: np.ndarray, bits: int, out: np.ndarray) -> np.ndarray:
    """:func:`dequantize_rows` in numpy, written into ``out`` ((R, C) float32): the same
    float32 arithmetic (the code as float32, plus the shift, times the row scale), so the
    same bits. ``scales`` float32 (R,)."""
    np.add(q, np.float32(_shift(bits)), out=out, dtype=np.float32)    # exact: small integers (+ 1/2)
    np.multiply(out, scales[:, None], out=out)
    return out


# |level| <= 127.5 < 2**7 for every width, so |level * s| < 2**127 < float32's max when
# |s| <= 2**120: the dequantised values of finite scales that small are finite.
FINITE_SCALE_BOUND = 2.0 ** 120


def scales_are_half(scales: torch.Tensor) -> bool:
    """Whether every scale survives a float16 round trip unchanged."""
    return bool(torch.equal(scales.float().half().float(), scales.float()))


def error_bound(scales: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """Per-row bound on |x - dequantize(quantize(x))| for ``fit=False`` scales:
    s/2 (nearest) or s (stochastic)."""
    return scales if stochastic else scales / 2
