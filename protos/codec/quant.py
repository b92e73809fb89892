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

import numpy as np
import torch

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
