"""What both sides know of a model without building it: parameter shapes and where each
head's rows or columns are. Every bound on a received update comes from here and from
the round's plan."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedmla.mla_model import MLAConfig, head_blocks, parameter_shapes


@dataclass(frozen=True)
class ModelSpec:
    """Parameter shapes of the global model and where each head's rows/columns are."""

    shapes: dict[str, tuple[int, ...]]
    head_blocks: dict[str, tuple[int, int]]   # suffix ("attn.wo.weight") -> (axis, block)
    heads_per_layer: tuple[int, ...]
    num_layers: int
    num_heads: int

    @classmethod
    def from_config(cls, cfg: MLAConfig) -> "ModelSpec":
        return cls(shapes=parameter_shapes(cfg), head_blocks=head_blocks(cfg),
                   heads_per_layer=tuple(cfg.layer_heads(i) for i in range(cfg.n_layers)),
                   num_layers=cfg.n_layers, num_heads=cfg.n_heads)

    def per_head(self, name: str) -> tuple[int, int, int] | None:
        """(layer, axis, block) for a per-head parameter, else None."""
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "layers" and parts[2] in self.head_blocks:
            axis, block = self.head_blocks[parts[2]]
            return int(parts[1]), axis, block
        return None

    def num_elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())
