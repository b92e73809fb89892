"""The MLA transformer (DeepSeek-V2/V3 attention), its head importance and pruning."""

from .config import PRESETS, MLAConfig
from .importance import HeadImportance, head_blocks, head_importance, normalize_per_layer, prune_heads
from .model import LatentCache, MLATransformer, init_global_state, parameter_shapes
from .stats import mla_cache_bytes_per_token, mla_flops_per_token, mla_param_count

__all__ = [
    "MLAConfig", "MLATransformer", "LatentCache", "PRESETS", "parameter_shapes", "init_global_state",
    "HeadImportance", "head_importance", "normalize_per_layer", "prune_heads", "head_blocks",
    "mla_cache_bytes_per_token", "mla_flops_per_token", "mla_param_count",
]
