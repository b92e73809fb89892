"""Triton kernels for row-wise int8 / int4 quantisation (see naive.py for the maths).

One program per row: a first pass over the row finds max|x|, a second writes q. The
stochastic variant draws its uniform noise with ``tl.rand(seed, offset)`` (Philox), so a
seed reproduces a result exactly on any device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import check_triton_device, next_pow2


@triton.jit
def _quantize_rows_kernel(X, Q, SCALES, NOISE, C, sx_r, sq_r, seed, QMAX: tl.constexpr,
                          BLOCK: tl.constexpr, MODE: tl.constexpr):
    """MODE 0: round to nearest; 1: stochastic with tl.rand; 2: stochastic with given NOISE."""
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, C, BLOCK):
        x = tl.load(X + r * sx_r + c0 + offs, mask=c0 + offs < C, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.max(amax, 0) / QMAX
    safe = tl.where(scale == 0.0, 1.0, scale)
    for c0 in range(0, C, BLOCK):
        cols = c0 + offs
        ok = cols < C
        y = tl.load(X + r * sx_r + cols, mask=ok, other=0.0).to(tl.float32) / safe
        if MODE == 0:
            y = tl.floor(y + 0.5)
        elif MODE == 1:
            y = tl.floor(y + tl.rand(seed, r * C + cols))
        else:
            y = tl.floor(y + tl.load(NOISE + r * C + cols, mask=ok, other=0.0))
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        tl.store(Q + r * sq_r + cols, y.to(tl.int8), mask=ok)
    tl.store(SCALES + r, scale)


@triton.jit
def _dequantize_rows_kernel(Q, SCALES, OUT, C, sq_r, so_r, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    scale = tl.load(SCALES + r)
    for c0 in range(0, C, BLOCK):
        ok = c0 + offs < C
        q = tl.load(Q + r * sq_r + c0 + offs, mask=ok, other=0).to(tl.float32)
        tl.store(OUT + r * so_r + c0 + offs, (q * scale).to(OUT.dtype.element_ty), mask=ok)


def _block(C: int) -> int:
    return min(max(next_pow2(C), 16), 4096)


def quantize_rows_triton(x: torch.Tensor, qmax: int, stochastic: bool = False, seed: int = 0,
                         noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, C) -> (q (R, C) int8, scales (R,) float32). ``noise`` (R, C) in [0, 1) replaces
    the kernel's own random draws (to compare with the reference bit for bit)."""
    check_triton_device(x, _quantize_rows_kernel)
    x = x if x.stride(-1) == 1 else x.contiguous()
    R, C = x.shape
    q = torch.empty(R, C, dtype=torch.int8, device=x.device)
    scales = torch.empty(R, dtype=torch.float32, device=x.device)
    if R == 0:
        return q, scales
    mode = 2 if noise is not None else (1 if stochastic else 0)
    noise_arg = noise.float().contiguous() if noise is not None else scales
    _quantize_rows_kernel[(R,)](x, q, scales, noise_arg, C, x.stride(0), q.stride(0), int(seed),
                                QMAX=qmax, BLOCK=_block(C), MODE=mode)
    return q, scales


def dequantize_rows_triton(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    check_triton_device(q, _dequantize_rows_kernel)
    q = q if q.stride(-1) == 1 else q.contiguous()
    R, C = q.shape
    out = torch.empty(R, C, dtype=dtype, device=q.device)
    if R == 0:
        return out
    _dequantize_rows_kernel[(R,)](q, scales.float().contiguous(), out, C, q.stride(0), out.stride(0), BLOCK=_block(C))
    return out
