"""Row-wise int8 / int4 quantisation for the update codec.

- :func:`quantize_rows` x (R, C) float -> (q (R, C) int8, scales (R,) float32)
- :func:`dequantize_rows` (q, scales) -> (R, C) float

int4 values are in [-7, 7] held in int8 (``protos.tensors.pack_int4`` packs them for the
wire). Stochastic rounding is unbiased; give ``seed`` to reproduce a draw. Maths in
naive.py; the Triton kernel in triton.py.
"""

from __future__ import annotations

import torch

from .._common import FLOAT_DTYPES, check_tensor, resolve_backend
from .naive import QMAX, dequantize_rows_naive, quantize_rows_naive, row_scales

__all__ = ["QMAX", "dequantize_rows", "dequantize_rows_naive", "quantize_rows", "quantize_rows_naive", "row_scales"]


def _check_bits(bits) -> int:
    if bits not in QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return bits


def quantize_rows(x: torch.Tensor, bits: int = 8, stochastic: bool = False, seed: int | None = None,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each row of x (R, C) symmetrically to ``bits`` (8 or 4).

    Returns (q (R, C) int8, scales (R,) float32) with x ~= q * scales[:, None].
    stochastic: round up with probability equal to the fractional part (unbiased);
    seed: makes the draw reproducible (None: a fresh seed from torch's generator).
    Non-finite inputs are rejected (a NaN would poison the row's scale).
    """
    check_tensor("x", x, 2)
    _check_bits(bits)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x has non-finite values; cannot quantise NaN or inf")
    which = resolve_backend(backend, x.device)
    if stochastic and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if which == "triton":
        from .triton import quantize_rows_triton

        return quantize_rows_triton(x, QMAX[bits], stochastic, seed or 0)
    noise = None
    if stochastic:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        noise = torch.rand(x.shape, generator=gen, device=x.device)
    return quantize_rows_naive(x, bits, noise)


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                    backend: str = "auto") -> torch.Tensor:
    """(q (R, C) int8, scales (R,)) -> (R, C) in dtype: q * scales[:, None]."""
    check_tensor("q", q, 2, dtypes=(torch.int8,))
    check_tensor("scales", scales, 1, dtypes=FLOAT_DTYPES)
    if scales.size(0) != q.size(0):
        raise ValueError(f"scales has {scales.size(0)} entries for {q.size(0)} rows of q")
    if scales.device != q.device:
        raise ValueError(f"scales is on {scales.device} but q is on {q.device}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be a float dtype, got {dtype}")
    which = resolve_backend(backend, q.device)
    if which == "triton":
        from .triton import dequantize_rows_triton

        return dequantize_rows_triton(q, scales, dtype)
    return dequantize_rows_naive(q, scales, dtype)
