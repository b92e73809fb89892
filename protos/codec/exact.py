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
"""

from __future__ import annotations

import torch

GRID_BITS = 40                 # the grid: multiples of 2**-40
LIMB_BITS = 40                 # the low limb holds 40 bits, the high limb the rest
MAX_TERM_BITS = 32             # |w * x| < 2**32: high limb < 2**32, sums of 2**22 terms fit int64
_SCALE = 2.0 ** GRID_BITS
_LIMB = 2.0 ** LIMB_BITS
_MAX = 2.0 ** (MAX_TERM_BITS + GRID_BITS)


class ExactSum:
    """Exact sums of float64 tensors of fixed shapes, as int64 limbs (hi, lo)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self._hi: dict[str, torch.Tensor] = {}
        self._lo: dict[str, torch.Tensor] = {}

    @staticmethod
    def limbs(term: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hi, lo) int64 limbs of ``term`` on the grid, both truncated toward zero: a term
        is hi * 2**40 + lo grid steps, |lo| < 2**40."""
        a = term.to(torch.float64) * _SCALE              # a power of two: exact
        if a.numel():
            low, high = torch.aminmax(a)
            if not (-_MAX < float(low) and float(high) < _MAX):      # NaN fails both
                raise OverflowError(f"a weighted value reaches 2**{MAX_TERM_BITS} in magnitude (or is not "
                                    f"finite): too large to sum exactly")
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

    def add_limbs(self, name: str, hi: torch.Tensor, lo: torch.Tensor, sign: int = 1) -> None:
        """Add limbs made by :meth:`limbs` (so that the costly split can run outside a lock)."""
        if name not in self._hi:
            self._hi[name] = torch.zeros(self.shapes[name], dtype=torch.int64)
            self._lo[name] = torch.zeros(self.shapes[name], dtype=torch.int64)
        if sign > 0:
            self._hi[name].add_(hi)
            self._lo[name].add_(lo)
        else:
            self._hi[name].sub_(hi)
            self._lo[name].sub_(lo)

    def value(self, name: str) -> torch.Tensor:
        """The sum of parameter ``name`` as float64 (zeros if nothing was added): a
        function of the integer limbs only, so of the set of terms, not their order."""
        if name not in self._hi:
            return torch.zeros(self.shapes[name], dtype=torch.float64)
        return (self._hi[name].to(torch.float64) * _LIMB + self._lo[name].to(torch.float64)) / _SCALE
