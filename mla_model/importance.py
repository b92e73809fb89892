"""Head importance (Michel et al. 2019) and head pruning.

I_h = E_batches |dL/d xi_h|, where xi_h is head h's output gate (value 1.0), then
normalised per layer by its L2 norm. A head whose output cannot reach the loss (for
example, zero ``wo`` columns) gets exactly 0.
"""

from __future__ import annotations

import torch

from .config import MLAConfig
from .model import MLATransformer


class HeadImportance:
    """Accumulates |dL/d gate| over backward passes.

    Usage::

        tracker = HeadImportance(model)      # gates now require grad
        for batch in data:
            model.loss(batch).backward()
            tracker.accumulate()             # reads and clears the gates' grads
        scores = tracker.scores()            # (L, H_max) normalised per layer
        tracker.close()                      # gates stop requiring grad
    """

    def __init__(self, model: MLATransformer):
        self.model = model
        self.gates = model.head_gates()
        for g in self.gates:
            g.requires_grad_(True)
            g.grad = None
        self.total = [torch.zeros_like(g, dtype=torch.float64) for g in self.gates]
        self.steps = 0

    def accumulate(self) -> None:
        for acc, g in zip(self.total, self.gates):
            if g.grad is not None:
                acc += g.grad.detach().abs().double()
                g.grad = None
        self.steps += 1

    def raw(self) -> torch.Tensor:
        """Mean |grad| per head, (L, H_max) float32; pruned slots are 0."""
        H = max(g.numel() for g in self.gates)
        out = torch.zeros(len(self.gates), H, dtype=torch.float64)
        for i, acc in enumerate(self.total):
            out[i, : acc.numel()] = acc.cpu() / max(self.steps, 1)
        return out.float()

    def scores(self) -> torch.Tensor:
        return normalize_per_layer(self.raw())

    def close(self) -> None:
        for g in self.gates:
            g.requires_grad_(False)
            g.grad = None


def normalize_per_layer(raw: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Divide each layer's row (L, H) by its L2 norm; an all-zero layer stays zero."""
    norm = raw.norm(dim=-1, keepdim=True)
    return torch.where(norm > eps, raw / norm.clamp_min(eps), torch.zeros_like(raw))


def head_importance(model: MLATransformer, batches, normalize: bool = True) -> torch.Tensor:
    """Importance (L, H) from the given token batches (each (B, T+1) int64); weights untouched."""
    tracker = HeadImportance(model)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model.loss(batch).backward()
            tracker.accumulate()
        model.zero_grad(set_to_none=True)
        return tracker.scores() if normalize else tracker.raw()
    finally:
        tracker.close()


def head_blocks(cfg: MLAConfig) -> dict[str, tuple[int, int]]:
    """For each per-head parameter suffix, (axis, block size per head).

    wq_b / wq and wkv_b own contiguous blocks of rows per head; wo owns blocks of columns.
    """
    q_name = "wq" if cfg.q_lora_rank == 0 else "wq_b"
    return {
        f"attn.{q_name}.weight": (0, cfg.qk_head_dim),
        "attn.wkv_b.weight": (0, cfg.qk_nope_head_dim + cfg.v_head_dim),
        "attn.wo.weight": (1, cfg.v_head_dim),
    }


def prune_heads(model: MLATransformer, heads: dict[int, list[int]] | list[list[int]]) -> MLATransformer:
    """A new, smaller model without the given heads ({layer: [head, ...]}).

    Their rows of wq_b (or wq) and wkv_b and their columns of wo are removed; the other
    weights and the remaining heads' gates are copied. At least one head must remain
    per layer.
    """
    cfg = model.cfg
    if isinstance(heads, list):
        heads = {i: h for i, h in enumerate(heads)}
    keep: list[list[int]] = []
    for i, blk in enumerate(model.layers):
        H = blk.attn.n_heads
        drop = set(heads.get(i, []))
        bad = [h for h in drop if not 0 <= h < H]
        if bad:
            raise ValueError(f"layer {i} has {H} heads; cannot prune heads {sorted(bad)}")
        kept = [h for h in range(H) if h not in drop]
        if not kept:
            raise ValueError(f"pruning would remove every head of layer {i}")
        keep.append(kept)
    new_cfg = MLAConfig.model_validate({**cfg.model_dump(), "heads_per_layer": tuple(len(k) for k in keep)})
    ref = model.embed.weight
    new = MLATransformer(new_cfg).to(ref.device)
    for p in new.parameters():  # only parameters: the rope table stays complex
        p.data = p.data.to(ref.dtype)
    state = model.state_dict()
    blocks = head_blocks(cfg)
    new_state = {}
    for name, t in state.items():
        if name.startswith("layers."):
            layer = int(name.split(".")[1])
            suffix = name.split(".", 2)[2]
            if suffix in blocks:
                axis, size = blocks[suffix]
                idx = torch.cat([torch.arange(h * size, (h + 1) * size) for h in keep[layer]]).to(t.device)
                t = t.index_select(axis, idx)
        new_state[name] = t
    new.load_state_dict(new_state)
    with torch.no_grad():
        for i, (g_new, g_old) in enumerate(zip(new.head_gates(), model.head_gates())):
            g_new.copy_(g_old[keep[i]])
    return new
