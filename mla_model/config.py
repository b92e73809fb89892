"""Typed configuration of an MLA transformer (DeepSeek-V2/V3 attention)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AttnMode = Literal["naive", "absorb"]


class MLAConfig(BaseModel):
    """Shapes and options of an :class:`~mla_model.MLATransformer`.

    Field names follow DeepSeek-V3's ``ModelArgs`` where one exists.
    ``heads_per_layer`` is set by :func:`~mla_model.prune_heads`; ``None`` means
    ``n_heads`` in every layer.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(256, gt=0, description="tokens in the vocabulary (256: raw bytes)")
    dim: int = Field(64, gt=0, description="model width d")
    n_layers: int = Field(2, gt=0)
    n_heads: int = Field(4, gt=0)
    inter_dim: int = Field(128, gt=0, description="hidden width of the SwiGLU MLP")
    q_lora_rank: int = Field(32, ge=0, description="rank of the query compression; 0 = one dense wq")
    kv_lora_rank: int = Field(32, gt=0, description="width of the cached latent c_KV")
    qk_nope_head_dim: int = Field(16, gt=0)
    qk_rope_head_dim: int = Field(8, gt=0, description="rope part of each query/key; even")
    v_head_dim: int = Field(16, gt=0)
    max_seq_len: int = Field(128, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    init_std: float = Field(0.02, gt=0)
    attn_mode: AttnMode = Field("naive", description="naive: per-head K,V (training); absorb: attend in latent space")
    heads_per_layer: tuple[int, ...] | None = Field(None, description="heads kept in each layer after pruning")
    tie_word_embeddings: bool = Field(True, description=(
        "the LM head is the embedding matrix; False adds a separate `lm_head` (imported checkpoints)"))

    @field_validator("qk_rope_head_dim")
    @classmethod
    def _rope_even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {v}")
        return v

    @model_validator(mode="after")
    def _check_heads(self) -> "MLAConfig":
        if self.heads_per_layer is not None:
            if len(self.heads_per_layer) != self.n_layers:
                raise ValueError(
                    f"heads_per_layer has {len(self.heads_per_layer)} entries but n_layers is {self.n_layers}"
                )
            bad = [h for h in self.heads_per_layer if not 1 <= h <= self.n_heads]
            if bad:
                raise ValueError(f"heads_per_layer entries must be in [1, n_heads={self.n_heads}], got {bad}")
        return self

    # ---- derived sizes -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5

    def layer_heads(self, layer: int) -> int:
        return self.n_heads if self.heads_per_layer is None else self.heads_per_layer[layer]

    @classmethod
    def preset(cls, name: str, **overrides) -> "MLAConfig":
        """A named preset (``tiny``, ``small``, ``base``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # For tests: a few thousand parameters per layer, runs in milliseconds.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, inter_dim=128, q_lora_rank=32, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_seq_len=128),
    # For benchmarks: about 6M parameters.
    "small": dict(dim=256, n_layers=8, n_heads=8, inter_dim=768, q_lora_rank=128, kv_lora_rank=64,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_seq_len=256),
    # DeepSeek-V2-Lite-like head shapes at a width that still trains on a CPU.
    "base": dict(dim=512, n_layers=8, n_heads=8, inter_dim=1408, q_lora_rank=0, kv_lora_rank=512,
                 qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_seq_len=1024),
}
