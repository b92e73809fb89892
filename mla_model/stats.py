"""Sizes of an MLA config: parameters, FLOPs per token, KV-cache bytes per token."""

from __future__ import annotations

from .config import MLAConfig


def mla_cache_bytes_per_token(cfg: MLAConfig, element_size: int = 2) -> int:
    """(kv_lora_rank + qk_rope_head_dim) * n_layers * element size."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * element_size


def mha_head_dim(cfg: MLAConfig) -> int:
    return max(cfg.dim // cfg.n_heads, 1)


def mha_cache_bytes_per_token(cfg: MLAConfig, element_size: int = 2) -> int:
    """2 * H * d_h * n_layers * element size for a multi-head attention of the same width and heads."""
    return 2 * cfg.n_heads * mha_head_dim(cfg) * cfg.n_layers * element_size


def _attn_matmul_params(cfg: MLAConfig, layer: int) -> int:
    H = cfg.layer_heads(layer)
    q = (cfg.dim * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim) if cfg.q_lora_rank else cfg.dim * H * cfg.qk_head_dim
    kv = cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + H * cfg.v_head_dim * cfg.dim


def mla_param_count(cfg: MLAConfig) -> int:
    norms = cfg.n_layers * 2 * cfg.dim + cfg.dim + cfg.n_layers * (cfg.kv_lora_rank + cfg.q_lora_rank)
    ffn = 3 * cfg.dim * cfg.inter_dim
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.dim
    return cfg.vocab_size * cfg.dim + head + norms + sum(_attn_matmul_params(cfg, i) + ffn for i in range(cfg.n_layers))


def mha_param_count(cfg: MLAConfig) -> int:
    ffn = 3 * cfg.dim * cfg.inter_dim
    attn = 4 * cfg.dim * cfg.n_heads * mha_head_dim(cfg)
    return cfg.vocab_size * cfg.dim + cfg.n_layers * (2 * cfg.dim + attn + ffn) + cfg.dim


def mla_flops_per_token(cfg: MLAConfig, context: int | None = None) -> int:
    """Forward FLOPs per token (2 per multiply-add) at a given context (default max_seq_len),
    counting the matmuls, the LM head and the attention scores/values for the average
    causal context of context/2 keys, in the naive (training) formulation."""
    ctx = (context or cfg.max_seq_len) / 2
    total = 2 * cfg.vocab_size * cfg.dim
    for i in range(cfg.n_layers):
        H = cfg.layer_heads(i)
        total += 2 * (_attn_matmul_params(cfg, i) + 3 * cfg.dim * cfg.inter_dim)
        total += 2 * ctx * H * (cfg.qk_head_dim + cfg.v_head_dim)
    return int(total)


def mha_flops_per_token(cfg: MLAConfig, context: int | None = None) -> int:
    ctx = (context or cfg.max_seq_len) / 2
    hd = mha_head_dim(cfg)
    per_layer = 2 * (4 * cfg.dim * cfg.n_heads * hd + 3 * cfg.dim * cfg.inter_dim) + 2 * ctx * cfg.n_heads * 2 * hd
    return int(2 * cfg.vocab_size * cfg.dim + cfg.n_layers * per_layer)
