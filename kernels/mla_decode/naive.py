"""Pure-torch reference of absorbed MLA decode, one request and one head at a time."""

from __future__ import annotations

import torch


def mla_decode_naive(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q_latent (B, H, c), q_pe (B, H, dr), kv_cache (B, Tmax, c), pe_cache (B, Tmax, dr),
    lengths (B,) valid cache entries per request. Returns (B, H, c) in q_latent's dtype:
    softmax over the first lengths[b] positions (fp32) of the latent rows; zero when
    lengths[b] == 0."""
    B, H, c = q_latent.shape
    out = torch.zeros(B, H, c, dtype=torch.float32, device=q_latent.device)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        kv, pe = kv_cache[b, :n].float(), pe_cache[b, :n].float()
        for h in range(H):
            s = (kv @ q_latent[b, h].float() + pe @ q_pe[b, h].float()) * scale
            out[b, h] = torch.softmax(s, dim=0) @ kv
    return out.to(q_latent.dtype)
