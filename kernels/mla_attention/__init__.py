"""MLA training attention (causal), forward and backward.

Public entry point: :func:`mla_attention`. Shapes:

- q (B, T, H, dn+dr): per-head query, the rope part last
- k_nope (B, S, H, dn): per-head non-rope key
- k_pe (B, S, dr): the ONE rope key shared by all heads (the Triton kernel reads it
  through its own pointer; it is never broadcast in memory)
- v (B, S, H, dv), dv may differ from dn+dr
- returns (B, T, H, dv) in q's dtype

With T < S the causal mask is aligned to the end (query i sees keys j <= i + S - T).
``heads`` (int indices or a boolean mask over H) selects active heads: inactive heads
are not computed, their outputs are zero and their gradients are zero.
``lengths`` (B,) gives each request's number of keys in a right-padded batch: keys
j >= lengths[b] are masked (padded query rows still attend to the valid keys; a
request of length 0 gets zeros).
"""

from __future__ import annotations

import math

import torch

from .._common import check_dim, check_same, check_tensor, normalize_heads, resolve_backend
from .chunked import mla_attention_chunked
from .naive import mla_attention_naive
from .sdpa import mla_attention_sdpa

# CPU, causal, no padding: query blocks against key prefixes up to this many queries
# (fastest measured there on 2 cores); longer sequences use SDPA with v padded to the qk dim.
CHUNKED_MAX_T = 1024

__all__ = ["mla_attention", "mla_attention_chunked", "mla_attention_naive", "mla_attention_sdpa",
           "validate_attention_args", "validate_lengths"]


def validate_lengths(lengths, B: int, S: int, device) -> torch.Tensor | None:
    """(B,) ints in [0, S] -> int32 tensor on device; None stays None."""
    if lengths is None:
        return None
    lens = torch.as_tensor(lengths)
    if lens.is_floating_point() or lens.dtype == torch.bool:
        raise ValueError(f"lengths must hold integers, got dtype {lens.dtype}")
    if lens.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},) (one per request), got {tuple(lens.shape)}")
    if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > S):
        raise ValueError(f"lengths must lie in [0, {S}] (the key length S), got {lens.tolist()}")
    return lens.to(device=device, dtype=torch.int32)


def validate_attention_args(q, k_nope, k_pe, v) -> None:
    check_tensor("q", q, 4)
    check_tensor("k_nope", k_nope, 4)
    check_tensor("k_pe", k_pe, 3)
    check_tensor("v", v, 4)
    names, ts = ["q", "k_nope", "k_pe", "v"], [q, k_nope, k_pe, v]
    check_same(names, ts, "dtype")
    check_same(names, ts, "device")
    B, T, H, dqk = q.shape
    S, dn, dr = k_nope.size(1), k_nope.size(-1), k_pe.size(-1)
    check_dim("k_nope", k_nope, 0, B, "batch B of q")
    check_dim("k_nope", k_nope, 2, H, "heads H of q")
    check_dim("k_pe", k_pe, 0, B, "batch B of q")
    check_dim("k_pe", k_pe, 1, S, "keys S of k_nope")
    check_dim("v", v, 0, B, "batch B of q")
    check_dim("v", v, 1, S, "keys S of k_nope")
    check_dim("v", v, 2, H, "heads H of q")
    if dqk != dn + dr:
        raise ValueError(f"q has head dim {dqk} but k_nope ({dn}) + k_pe ({dr}) give {dn + dr}")


def mla_attention(q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                  scale: float | None = None, causal: bool = True, heads=None, lengths=None,
                  backend: str = "auto") -> torch.Tensor:
    """MLA attention with autograd through every backend (see module docstring for shapes).

    scale defaults to 1/sqrt(dn+dr). backend: ``auto`` (CUDA -> Triton, CPU -> the torch
    path), ``triton``, ``torch`` or ``naive``. The torch path is the causal block path
    (:mod:`.chunked`) for causal attention without ``lengths`` and T <= CHUNKED_MAX_T,
    else SDPA with v zero-padded to the qk dim.
    """
    validate_attention_args(q, k_nope, k_pe, v)
    if scale is None:
        scale = q.size(-1) ** -0.5
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    h = normalize_heads(heads, q.size(2), q.device)
    lens = validate_lengths(lengths, q.size(0), k_nope.size(1), q.device)
    which = resolve_backend(backend, q.device)
    if which == "naive" or (h is not None and h.numel() == 0):
        # (No active head at all: the reference returns zeros with zero gradients.)
        return mla_attention_naive(q, k_nope, k_pe, v, scale, causal, h, lens)
    if which == "torch":
        T = q.size(1)
        if q.device.type == "cpu" and causal and lens is None and T <= CHUNKED_MAX_T:
            return mla_attention_chunked(q, k_nope, k_pe, v, scale, h)
        return mla_attention_sdpa(q, k_nope, k_pe, v, scale, causal, h, lens)
    from .triton import MLAAttentionTriton  # imported lazily: decorating kernels reads TRITON_INTERPRET

    return MLAAttentionTriton.apply(q, k_nope, k_pe, v, scale, causal, h, lens)
