"""Attention cores of MLA in plain torch.

These are the model's default implementations; ``kernels`` provides fused versions
with the same signatures. Shapes:

- B batch, T query length, S key length, H heads
- dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim, c = kv_lora_rank
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mla_attention_torch(q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                        scale: float, causal: bool = True) -> torch.Tensor:
    """Per-head ("naive") MLA attention.

    q (B, T, H, dn+dr) with the rope part last; k_nope (B, S, H, dn); k_pe (B, S, dr),
    the ONE rope key shared by every head; v (B, S, H, dv). Returns (B, T, H, dv).

    Uses scaled_dot_product_attention with v zero-padded to the qk dim, which keeps
    the CPU flash kernel (it falls back to the slow math path when dims differ).
    When T < S (decoding with a cache) the causal mask is aligned to the end.
    """
    B, T, H, dqk = q.shape
    S = k_nope.size(1)
    dv = v.size(-1)
    k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, H, k_pe.size(-1))], dim=-1)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    vt = v.transpose(1, 2)
    if dv < dqk:
        vt = F.pad(vt, (0, dqk - dv))
    mask = None
    is_causal = causal and T > 1
    if is_causal and T != S:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        is_causal = False
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=is_causal, scale=scale)
    return out[..., :dv].transpose(1, 2)


def mla_absorbed_attention_torch(q_latent: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
                                 scale: float, causal: bool = True) -> torch.Tensor:
    """Absorbed MLA attention over the latent cache.

    q_latent (B, T, H, c): the nope query already multiplied by W_UK; q_pe (B, T, H, dr);
    kv (B, S, c) the normalised latent; pe (B, S, dr) the rotated shared rope key.
    Returns the attention-weighted latent (B, T, H, c); the caller applies W_UV.
    Scores and softmax in fp32.
    """
    T, S = q_latent.size(1), kv.size(1)
    scores = torch.einsum("bthc,bsc->bhts", q_latent.float(), kv.float())
    scores = scores + torch.einsum("bthr,bsr->bhts", q_pe.float(), pe.float())
    scores = scores * scale
    if causal and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=kv.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhts,bsc->bthc", probs, kv.float()).to(q_latent.dtype)
