"""Pure-torch reference of MLA training attention.

Explicit scores, fp32 softmax, the shared rope key used through einsum (never
expanded per head). Slow and memory-hungry (O(T*S) per head) by design: it is the
ground truth the kernels are tested against.
"""

from __future__ import annotations

import torch


def mla_attention_naive(q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                        scale: float, causal: bool = True, heads: torch.Tensor | None = None,
                        lengths: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, T, H, dn+dr) rope part last; k_nope (B, S, H, dn); k_pe (B, S, dr) shared by all
    heads; v (B, S, H, dv); heads: optional int tensor of active head indices; lengths:
    optional (B,) key lengths of a padded batch (keys j >= lengths[b] are masked).

    Returns (B, T, H, dv) in q's dtype; inactive heads' rows are zero. The causal mask
    is aligned to the end when T < S (query i sees keys j <= i + S - T).
    """
    B, T, H, _ = q.shape
    S, dn = k_nope.size(1), k_nope.size(-1)
    qf, knf, kpf, vf = q.float(), k_nope.float(), k_pe.float(), v.float()
    if heads is not None:
        idx = heads.long().to(q.device)
        qf, knf, vf = qf[:, :, idx], knf[:, :, idx], vf[:, :, idx]
    scores = torch.einsum("bthd,bshd->bhts", qf[..., :dn], knf)
    scores = scores + torch.einsum("bthr,bsr->bhts", qf[..., dn:], kpf)
    scores = scores * scale
    if causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
    if lengths is not None:
        pad = torch.arange(S, device=q.device).view(1, S) >= lengths.to(q.device).long().view(B, 1)
        scores = scores.masked_fill(pad.view(B, 1, 1, S), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Rows with no visible key (S < T, or a length of 0) would be NaN: define them as zero.
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("bhts,bshd->bthd", probs, vf)
    if heads is not None:
        full = out.new_zeros(B, T, H, v.size(-1))
        full[:, :, idx] = out
        out = full
    return out.to(q.dtype)
