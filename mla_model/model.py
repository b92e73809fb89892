"""An MLA transformer following DeepSeek-V2 (arXiv 2405.04434, section 2.1) with
DeepSeek-V3's parameter names, so that state_dict keys map by name."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import mla_absorbed_attention_torch, mla_attention_torch
from .config import MLAConfig
from .rope import apply_rotary_emb, precompute_freqs_cis


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


@dataclass
class LatentCache:
    """Per-layer decode cache: only the normalised latent and the shared rope key.

    kv[l]: (B, max_len, kv_lora_rank); pe[l]: (B, max_len, qk_rope_head_dim).
    Bytes per token = (kv_lora_rank + qk_rope_head_dim) * n_layers * element size.
    """

    kv: list[torch.Tensor]
    pe: list[torch.Tensor]
    length: int = 0
    lengths: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, cfg: MLAConfig, batch: int, max_len: int, dtype=torch.float32, device=None) -> "LatentCache":
        kv = [torch.zeros(batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        pe = [torch.zeros(batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        return cls(kv=kv, pe=pe)

    @property
    def max_len(self) -> int:
        return self.kv[0].size(1)

    def nbytes(self) -> int:
        """Bytes allocated by the cache (all layers, all batch rows, max_len tokens)."""
        return sum(t.numel() * t.element_size() for t in (*self.kv, *self.pe))


class MLA(nn.Module):
    """Multi-head latent attention with a per-head output gate.

    The gate (H,) is a non-persistent buffer of ones (so state_dict keys stay
    DeepSeek-V3's); it multiplies each head's output before ``wo``. Its gradient
    measures head importance; a gate of 0 masks the head.
    """

    def __init__(self, cfg: MLAConfig, n_heads: int):
        super().__init__()
        self.cfg = cfg
        self.n_heads = n_heads
        self.dn, self.dr, self.dv, self.c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        qk = self.dn + self.dr
        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, n_heads * qk, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, n_heads * qk, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.c + self.dr, bias=False)
        self.kv_norm = RMSNorm(self.c, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.c, n_heads * (self.dn + self.dv), bias=False)
        self.wo = nn.Linear(n_heads * self.dv, cfg.dim, bias=False)
        self.register_buffer("head_gate", torch.ones(n_heads), persistent=False)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank == 0:
            return self.wq(x)
        return self.wq_b(self.q_norm(self.wq_a(x)))

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, cache: LatentCache | None = None,
                layer: int = 0, start_pos: int = 0) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim). With a cache, tokens sit at positions start_pos.."""
        B, T, _ = x.shape
        H = self.n_heads
        q = self._query(x).view(B, T, H, self.dn + self.dr)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        kv_a = self.wkv_a(x)
        latent, k_pe = kv_a.split([self.c, self.dr], dim=-1)
        latent = self.kv_norm(latent)
        k_pe = apply_rotary_emb(k_pe, freqs_cis)  # (B, T, dr): one rope key for all heads
        if cache is not None:
            end = start_pos + T
            if end > cache.max_len:
                raise ValueError(f"cache holds {cache.max_len} tokens, asked to write up to position {end}")
            cache.kv[layer][:B, start_pos:end] = latent.to(cache.kv[layer].dtype)
            cache.pe[layer][:B, start_pos:end] = k_pe.to(cache.pe[layer].dtype)
            latent = cache.kv[layer][:B, :end].to(x.dtype)
            k_pe = cache.pe[layer][:B, :end].to(x.dtype)
        wkv_b = self.wkv_b.weight.view(H, self.dn + self.dv, self.c)
        if self.cfg.attn_mode == "naive":
            kv = F.linear(latent, self.wkv_b.weight).view(B, latent.size(1), H, self.dn + self.dv)
            k_nope, v = kv.split([self.dn, self.dv], dim=-1)
            o = mla_attention_torch(torch.cat([q_nope, q_pe], dim=-1), k_nope, k_pe, v, self.cfg.softmax_scale)
        else:
            # Fold W_UK into the query and W_UV into the output: attend in latent space.
            q_latent = torch.einsum("bthd,hdc->bthc", q_nope, wkv_b[:, : self.dn])
            o_latent = mla_absorbed_attention_torch(q_latent, q_pe, latent, k_pe, self.cfg.softmax_scale)
            o = torch.einsum("bthc,hdc->bthd", o_latent, wkv_b[:, self.dn:])
        o = o * self.head_gate.to(o.dtype).view(1, 1, H, 1)
        return self.wo(o.reshape(B, T, H * self.dv))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: MLAConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg, cfg.layer_heads(layer))
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x, freqs_cis, cache=None, start_pos=0):
        x = x + self.attn(self.attn_norm(x), freqs_cis, cache, self.layer, start_pos)
        return x + self.ffn(self.ffn_norm(x))


class MLATransformer(nn.Module):
    """Decoder-only MLA transformer: tokens (B, T) int64 -> logits (B, T, vocab_size).

    The LM head is tied to ``embed`` unless ``cfg.tie_word_embeddings`` is False, in which
    case a separate ``lm_head`` (vocab_size, dim) holds it. Attention mode (naive / absorb) comes from the
    config; :meth:`set_attn_mode` switches it in place.
    """

    def __init__(self, cfg: MLAConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer(
            "freqs_cis", precompute_freqs_cis(cfg.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta), persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                with torch.no_grad():
                    p.normal_(0.0, std, generator=generator)

    # ---- forward -------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, cache: LatentCache | None = None, start_pos: int = 0) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be a (B, T) int64 tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        T = tokens.size(1)
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {start_pos + T} exceed max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens)
        freqs = self.freqs_cis[start_pos: start_pos + T]
        for layer in self.layers:
            x = layer(x, freqs, cache, start_pos)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(x), head)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of tokens (B, T+1): predict tokens[:, 1:] from tokens[:, :-1]."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None) -> LatentCache:
        dtype = dtype or self.embed.weight.dtype
        return LatentCache.empty(self.cfg, batch, max_len or self.cfg.max_seq_len, dtype, self.embed.weight.device)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation of prompt (B, T0) with the latent cache."""
        B, T0 = prompt.shape
        total = T0 + max_new_tokens
        cache = self.new_cache(B, total)
        logits = self(prompt, cache, 0)[:, -1]
        out = [prompt]
        pos = T0
        for _ in range(max_new_tokens):
            if temperature > 0:
                nxt = torch.multinomial((logits.float() / temperature).softmax(-1), 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if pos >= total:
                break
            logits = self(nxt, cache, pos)[:, -1]
            pos += 1
        return torch.cat(out, dim=1)[:, :total]

    # ---- heads ---------------------------------------------------------------------
    def head_gates(self) -> list[torch.Tensor]:
        """The per-layer gate buffers, each (H_l,), in layer order (live tensors)."""
        return [blk.attn.head_gate for blk in self.layers]

    def set_head_mask(self, mask) -> None:
        """Set gates from a (L, H) 0/1 mask (tensor or nested lists)."""
        for gate, row in zip(self.head_gates(), mask):
            gate.copy_(torch.as_tensor(row, dtype=gate.dtype, device=gate.device))

    def set_attn_mode(self, mode: str) -> "MLATransformer":
        """Switch between ``naive`` and ``absorb`` in place (same weights); returns self."""
        cfg = MLAConfig.model_validate({**self.cfg.model_dump(), "attn_mode": mode})
        self.cfg = cfg
        for blk in self.layers:
            blk.attn.cfg = cfg
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def parameter_shapes(cfg: MLAConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of ``MLATransformer(cfg).state_dict()``, from the config
    alone: no module is built (building one on the meta device imports torch._dynamo, which
    costs a coordinator ~150 MB). Tested against the real model's state dict."""
    d = cfg.dim
    qk, dn, dr, dv, c = cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        h, p = cfg.layer_heads(i), f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        if cfg.q_lora_rank == 0:
            shapes[p + "attn.wq.weight"] = (h * qk, d)
        else:
            shapes[p + "attn.wq_a.weight"] = (cfg.q_lora_rank, d)
            shapes[p + "attn.q_norm.weight"] = (cfg.q_lora_rank,)
            shapes[p + "attn.wq_b.weight"] = (h * qk, cfg.q_lora_rank)
        shapes[p + "attn.wkv_a.weight"] = (c + dr, d)
        shapes[p + "attn.kv_norm.weight"] = (c,)
        shapes[p + "attn.wkv_b.weight"] = (h * (dn + dv), c)
        shapes[p + "attn.wo.weight"] = (d, h * dv)
        shapes[p + "ffn_norm.weight"] = (d,)
        shapes[p + "ffn.w1.weight"] = (cfg.inter_dim, d)
        shapes[p + "ffn.w2.weight"] = (d, cfg.inter_dim)
        shapes[p + "ffn.w3.weight"] = (cfg.inter_dim, d)
    shapes["norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def init_global_state(cfg: MLAConfig, seed: int) -> dict[str, torch.Tensor]:
    """The round-0 global weights, reproducible from ``seed`` (every party can rebuild
    them, so a client that holds nothing needs no download to start from version 0)."""
    model = MLATransformer(cfg)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
