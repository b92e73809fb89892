"""Absorbed MLA decode: one new query token per request over the latent cache.

Public entry point: :func:`mla_decode`. Shapes (c = kv_lora_rank, dr = rope dim):

- q_latent (B, H, c): each head's nope query already multiplied by W_UK
- q_pe (B, H, dr): each head's rotated rope query
- kv_cache (B, Tmax, c): the normalised latent c_KV; pe_cache (B, Tmax, dr): the rotated
  shared rope key. Only the first lengths[b] rows of request b are read.
- lengths (B,) int (tensor or sequence); None means every request uses all Tmax rows
- returns (B, H, c), the attention-weighted latent (apply W_UV afterwards); a request
  with length 0 gets zeros.

All heads of a request read the same cache rows once. Scores and softmax in fp32.
"""

from __future__ import annotations

import math

import torch

from .._common import check_dim, check_same, check_tensor, resolve_backend
from .naive import mla_decode_naive

__all__ = ["mla_decode", "mla_decode_naive", "mla_decode_torch", "validate_decode_args"]


def validate_decode_args(q_latent, q_pe, kv_cache, pe_cache, lengths) -> torch.Tensor:
    """Check shapes, dtypes and devices; return lengths as an int32 tensor on the cache's device."""
    check_tensor("q_latent", q_latent, 3)
    check_tensor("q_pe", q_pe, 3)
    check_tensor("kv_cache", kv_cache, 3)
    check_tensor("pe_cache", pe_cache, 3)
    names, ts = ["q_latent", "q_pe", "kv_cache", "pe_cache"], [q_latent, q_pe, kv_cache, pe_cache]
    check_same(names, ts, "dtype")
    check_same(names, ts, "device")
    B, H, c = q_latent.shape
    Tmax, dr = kv_cache.size(1), pe_cache.size(-1)
    check_dim("q_pe", q_pe, 0, B, "batch B of q_latent")
    check_dim("q_pe", q_pe, 1, H, "heads H of q_latent")
    check_dim("kv_cache", kv_cache, 0, B, "batch B of q_latent")
    check_dim("kv_cache", kv_cache, 2, c, "latent width c of q_latent")
    check_dim("pe_cache", pe_cache, 0, B, "batch B of q_latent")
    check_dim("pe_cache", pe_cache, 1, Tmax, "cache length Tmax of kv_cache")
    check_dim("pe_cache", pe_cache, 2, q_pe.size(-1), "rope dim of q_pe")
    if lengths is None:
        return torch.full((B,), Tmax, dtype=torch.int32, device=kv_cache.device)
    lens = torch.as_tensor(lengths)
    if lens.is_floating_point() or lens.dtype == torch.bool:
        raise ValueError(f"lengths must hold integers, got dtype {lens.dtype}")
    if lens.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},) (one per request), got {tuple(lens.shape)}")
    if lens.device.type == "cpu" or kv_cache.device.type == "cpu":
        # On a GPU this check would cost a host sync per step; there the caller vouches.
        lo, hi = int(lens.min()), int(lens.max())
        if lo < 0 or hi > Tmax:
            raise ValueError(f"lengths must lie in [0, {Tmax}] (the cache length), got min {lo} max {hi}")
    return lens.to(device=kv_cache.device, dtype=torch.int32)


def mla_decode_torch(q_latent, q_pe, kv_cache, pe_cache, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """Batched torch path: three bmm calls in which every head shares one read of the cache
    (the heads form the M dimension of a (H, c) x (c, S) product), fp32 softmax."""
    B, H, c = q_latent.shape
    S = int(lengths.max()) if lengths.numel() else 0
    if S == 0:
        return q_latent.new_zeros(B, H, c)
    any_empty = bool((lengths == 0).any())
    compute = torch.float32 if q_latent.dtype != torch.float32 else None
    kv, pe = kv_cache[:, :S], pe_cache[:, :S]
    ql, qp = q_latent, q_pe
    if compute is not None:
        kv, pe, ql, qp = kv.to(compute), pe.to(compute), ql.to(compute), qp.to(compute)
    scores = torch.baddbmm(torch.bmm(qp, pe.transpose(1, 2)), ql, kv.transpose(1, 2), alpha=scale, beta=scale)
    if bool((lengths < S).any()):
        pad = torch.arange(S, device=kv.device).view(1, 1, S) >= lengths.view(B, 1, 1)
        scores = scores.masked_fill(pad, float("-inf"))
        # Rows past a request's length may hold stale values (even NaN): 0 * NaN is NaN.
        kv = kv.masked_fill(pad.view(B, S, 1), 0.0)
    probs = torch.softmax(scores, dim=-1)
    if any_empty:
        probs = torch.nan_to_num(probs, nan=0.0)  # requests with length 0
    return torch.bmm(probs, kv).to(q_latent.dtype)


def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
               lengths=None, scale: float | None = None, num_splits: int | None = None,
               backend: str = "auto") -> torch.Tensor:
    """Absorbed decode (see module docstring). scale defaults to 1/sqrt(c + dr) only for
    convenience: MLA models pass 1/sqrt(qk_nope_head_dim + qk_rope_head_dim).
    num_splits: splits along the cache for the Triton path (None: a heuristic)."""
    lens = validate_decode_args(q_latent, q_pe, kv_cache, pe_cache, lengths)
    if scale is None:
        scale = (q_latent.size(-1) + q_pe.size(-1)) ** -0.5
    if not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    which = resolve_backend(backend, q_latent.device)
    if which == "naive":
        return mla_decode_naive(q_latent, q_pe, kv_cache, pe_cache, lens, float(scale))
    if which == "torch":
        return mla_decode_torch(q_latent, q_pe, kv_cache, pe_cache, lens, float(scale))
    from .triton import mla_decode_triton  # lazily: decorating kernels reads TRITON_INTERPRET

    return mla_decode_triton(q_latent, q_pe, kv_cache, pe_cache, lens, float(scale), num_splits)
