"""Attention cores of MLA, dispatched to ``kernels``.

The model calls these two functions; they route to the fused kernels by device
(CUDA -> Triton; CPU -> the fastest correct torch path), see ``kernels/``. Shapes:

- B batch, T query length, S key length, H heads
- dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim, c = kv_lora_rank

``backend`` ("auto", "triton", "torch", "naive") forces a path, e.g. the Triton
interpreter on CPU in tests.
"""

from __future__ import annotations

import torch

from fedmla.kernels.mla_attention import mla_attention
from fedmla.kernels.mla_decode import mla_decode


def mla_attention_torch(q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                        scale: float, causal: bool = True, heads=None, backend: str = "auto") -> torch.Tensor:
    """Per-head ("naive") MLA attention.

    q (B, T, H, dn+dr) with the rope part last; k_nope (B, S, H, dn); k_pe (B, S, dr),
    the ONE rope key shared by every head; v (B, S, H, dv). Returns (B, T, H, dv).
    When T < S (decoding with a cache) the causal mask is aligned to the end.
    heads: optional active-head indices; the others are not computed and give zeros.
    """
    return mla_attention(q, k_nope, k_pe, v, scale=scale, causal=causal, heads=heads, backend=backend)


def mla_absorbed_attention_torch(q_latent: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
                                 scale: float, causal: bool = True, backend: str = "auto") -> torch.Tensor:
    """Absorbed MLA attention over the latent cache.

    q_latent (B, T, H, c): the nope query already multiplied by W_UK; q_pe (B, T, H, dr);
    kv (B, S, c) the normalised latent; pe (B, S, dr) the rotated shared rope key.
    Returns the attention-weighted latent (B, T, H, c); the caller applies W_UV.
    Scores and softmax in fp32. One query token (decoding) goes to the latent decode
    kernel, where all heads share one read of the cache; T > 1 (prefill) uses einsum.
    """
    T, S = q_latent.size(1), kv.size(1)
    if T == 1:
        return mla_decode(q_latent[:, 0], q_pe[:, 0], kv, pe, None, scale=scale, backend=backend).unsqueeze(1)
    scores = torch.einsum("bthc,bsc->bhts", q_latent.float(), kv.float())
    scores = scores + torch.einsum("bthr,bsr->bhts", q_pe.float(), pe.float())
    scores = scores * scale
    if causal and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=kv.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhts,bsc->bthc", probs, kv.float()).to(q_latent.dtype)
