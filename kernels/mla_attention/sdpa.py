"""The CPU (and fallback) torch path of MLA attention: scaled_dot_product_attention.

CPU SDPA uses its fused flash kernel only when q, k and v share a head dim; with
dv != dn+dr it falls back to the slow math path. Zero-padding v to the qk dim and
slicing the output keeps the flash path (the padded columns of the output are exactly
zero and their gradient is discarded by the slice). SDPA needs a per-head key, so the
shared rope key is expanded here; this is the one place that does it, and only on
the torch path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mask(B: int, T: int, S: int, causal: bool, lengths: torch.Tensor | None, device):
    """(attn_mask or None, is_causal, empty rows or None) for SDPA. The mask is (T, S) or,
    with lengths, (B, 1, T, S); rows with no visible key are reported so that they can be
    zeroed (SDPA would give NaN for them)."""
    if lengths is not None and bool((lengths == S).all()):
        lengths = None  # no padding: keep SDPA's mask-free (is_causal) fast path
    if lengths is None and (not causal or T == S):
        return None, causal and T > 1, None
    mask = torch.ones(T, S, dtype=torch.bool, device=device)
    if causal:
        mask = mask.tril(diagonal=S - T)
    if lengths is not None:
        keys = torch.arange(S, device=device).view(1, S) < lengths.to(device).long().view(B, 1)
        mask = mask.view(1, 1, T, S) & keys.view(B, 1, 1, S)
    empty = ~mask.any(-1, keepdim=True)
    if bool(empty.any()):
        return mask | empty, False, empty
    return mask, False, None


def mla_attention_sdpa(q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                       scale: float, causal: bool = True, heads: torch.Tensor | None = None,
                       lengths: torch.Tensor | None = None, pad_v: bool = True) -> torch.Tensor:
    """Shapes as :func:`kernels.mla_attention.mla_attention`. ``pad_v=False`` gives SDPA's
    math path (kept for the benchmark's comparison)."""
    B, T, H, dqk = q.shape
    S, dv = k_nope.size(1), v.size(-1)
    if heads is not None:
        idx = heads.to(device=q.device, dtype=torch.long)
        q, k_nope, v = q.index_select(2, idx), k_nope.index_select(2, idx), v.index_select(2, idx)
    h = q.size(2)
    k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, h, k_pe.size(-1))], dim=-1)
    vt = v.transpose(1, 2)
    if pad_v and dv < dqk:
        vt = F.pad(vt, (0, dqk - dv))
    mask, is_causal, empty = _mask(B, T, S, causal, lengths, q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), vt,
                                         attn_mask=mask, is_causal=is_causal, scale=scale)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)  # (T, 1) or (B, 1, T, 1): broadcasts over heads and dims
    out = out[..., :dv].transpose(1, 2)
    if heads is not None:
        full = out.new_zeros(B, T, H, dv)
        out = full.index_copy(2, idx, out)
    return out
