"""A CPU path of causal MLA attention that skips the masked half: query blocks against key prefixes.

For a query block of rows [s, e) only keys [0, e + S - T) can be visible, so the block's
scores are one (bs, e') matrix per head instead of a (bs, S) one: about half the work of
a dense causal attention, with plain matmuls that run at full speed on a CPU, and no
padding of v. The shared rope key is used as it is: the rope scores of all heads are
one batched matmul of (H * bs, dr) query rows against the (dr, e') key, so it is never
broadcast in memory. Autograd differentiates the blocks (their probabilities are kept
for the backward: B * H * T * S / 2 floats, what the math path keeps for the full square).

Used by :func:`kernels.mla_attention.mla_attention` on CPU for causal attention without
``lengths`` up to ``CHUNKED_MAX_T`` queries (measured faster than SDPA's flash kernel
there, see kernels/bench.py and the README); other cases go to the padded-v SDPA path.
"""

from __future__ import annotations

import torch

BLOCK = 128


def mla_attention_chunked(q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
                          scale: float, heads: torch.Tensor | None = None, block: int = BLOCK) -> torch.Tensor:
    """Causal attention, shapes as :func:`kernels.mla_attention.mla_attention` (no ``lengths``)."""
    B, T, H, dqk = q.shape
    S, dn, dv = k_nope.size(1), k_nope.size(-1), v.size(-1)
    if heads is not None:
        idx = heads.to(device=q.device, dtype=torch.long)
        q, k_nope, v = q.index_select(2, idx), k_nope.index_select(2, idx), v.index_select(2, idx)
    h = q.size(2)
    q = q * scale                                # scaling the queries once is cheaper than every score block
    qn = q[..., :dn].transpose(1, 2).reshape(B * h, T, dn)
    qr = q[..., dn:].transpose(1, 2)             # (B, h, T, dr)
    kn_t = k_nope.permute(0, 2, 3, 1).reshape(B * h, dn, S)     # (B*h, dn, S)
    vt = v.transpose(1, 2).reshape(B * h, S, dv)
    kr_t = k_pe.transpose(1, 2)                  # (B, dr, S): the one rope key
    offset = S - T                               # query i sees keys j <= i + offset
    outs = []
    for s in range(0, T, block):
        e = min(s + block, T)
        visible = e + offset                     # keys [0, visible) may be seen by this block
        bs = e - s
        if visible <= 0:
            outs.append(q.new_zeros(B * h, bs, dv))
            continue
        # rope scores of all heads: (B, h*bs, dr) @ (B, dr, vis), then + the per-head nope scores, fused
        rope = (qr[:, :, s:e].reshape(B, h * bs, -1) @ kr_t[:, :, :visible]).view(B * h, bs, visible)
        scores = torch.baddbmm(rope, qn[:, s:e], kn_t[:, :, :visible])                    # (B*h, bs, vis)
        first_hidden = s + offset + 1            # row 0 of the block sees keys < s + offset + 1
        if first_hidden < visible:
            rows = torch.arange(s, e, device=q.device).view(bs, 1) + offset
            cols = torch.arange(visible, device=q.device).view(1, visible)
            hidden = cols > rows                                                          # (bs, vis)
            scores.masked_fill_(hidden, float("-inf"))   # in place: baddbmm's backward does not need its output
            empty = hidden.all(-1)               # rows with no visible key (only when T > S)
        else:
            empty = None
        p = torch.softmax(scores, dim=-1)
        if empty is not None and bool(empty.any()):
            p = p.masked_fill(empty.view(bs, 1), 0.0)
        outs.append(torch.bmm(p, vt[:, :visible]))
    out = torch.cat(outs, dim=1).view(B, h, T, dv).transpose(1, 2)   # (B, T, h, dv)
    if heads is not None:
        full = out.new_zeros(B, T, H, dv)
        out = full.index_copy(2, idx, out)
    return out
