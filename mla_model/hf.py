"""Hugging Face DeepSeek-V2/V3 checkpoints <-> fedmla's MLA transformer: pure mapping.

What maps: the dense-MLP form of transformers' ``DeepseekV3ForCausalLM`` and
``DeepseekV2ForCausalLM`` (every layer a SwiGLU MLP, i.e. ``first_k_dense_replace >=
num_hidden_layers``), with or without q compression (``q_lora_rank`` null = one ``q_proj``),
tied or untied LM head, plain RoPE. Everything else is refused with
:class:`HFCheckpointError` naming the file and the field.

Names (fedmla <- HF), per layer ``i``::

    embed.weight                      model.embed_tokens.weight
    layers.i.attn_norm.weight         model.layers.i.input_layernorm.weight
    layers.i.attn.wq.weight           model.layers.i.self_attn.q_proj.weight            (q_lora_rank 0)
    layers.i.attn.wq_a.weight         model.layers.i.self_attn.q_a_proj.weight
    layers.i.attn.q_norm.weight       model.layers.i.self_attn.q_a_layernorm.weight
    layers.i.attn.wq_b.weight         model.layers.i.self_attn.q_b_proj.weight
    layers.i.attn.wkv_a.weight        model.layers.i.self_attn.kv_a_proj_with_mqa.weight
    layers.i.attn.kv_norm.weight      model.layers.i.self_attn.kv_a_layernorm.weight
    layers.i.attn.wkv_b.weight        model.layers.i.self_attn.kv_b_proj.weight
    layers.i.attn.wo.weight           model.layers.i.self_attn.o_proj.weight
    layers.i.ffn_norm.weight          model.layers.i.post_attention_layernorm.weight
    layers.i.ffn.w1/w2/w3.weight      model.layers.i.mlp.gate_proj/down_proj/up_proj.weight
    norm.weight                       model.norm.weight
    lm_head.weight                    lm_head.weight                                    (untied only)

RoPE layout. fedmla rotates adjacent pairs ``(x[2j], x[2j+1])`` (DeepSeek's own layout).
transformers' DeepSeek-V2 does the same (complex multiply), and so does DeepSeek-V3 with
``rope_interleave: true`` (its default; it returns the rotated pairs de-interleaved, but
queries and keys alike, so scores are unchanged). With ``rope_interleave: false``
DeepSeek-V3 rotates ``(x[j], x[j + d/2])`` instead; the rope rows of ``q_b_proj`` /
``q_proj`` (per head) and of ``kv_a_proj_with_mqa`` are then permuted on the way in and
back on the way out. Permutations are exact, so a round trip is bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import MLAConfig

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
# transformers' defaults for fields a config.json may leave out (DeepseekV3Config / DeepseekV2Config).
_FIRST_K_DENSE_DEFAULT = {"deepseek_v3": 3, "deepseek_v2": 0}
_TIE_DEFAULT = False
# The latent norms (q_a_layernorm, kv_a_layernorm) of transformers' DeepSeek models are built
# with the RMSNorm default eps, not rms_norm_eps; fedmla uses one eps for every norm.
_LATENT_NORM_EPS = 1e-6


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint fedmla cannot use (or a model it cannot export); the
    message names the file and the field or tensor at fault."""


def _rope_theta(hf: Mapping, where: str) -> float:
    """rope_theta from ``rope_parameters`` (transformers >= 5) or the top level (older files);
    anything but plain RoPE is refused."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if scaling not in (None, {}):
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise HFCheckpointError(f"{where}: rope_scaling={json_short(scaling)}: only plain RoPE is supported "
                                    f"(no YaRN, linear or dynamic scaling)")
    theta = hf.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict):
            raise HFCheckpointError(f"{where}: rope_parameters must be an object, got {json_short(params)}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise HFCheckpointError(f"{where}: rope_parameters.rope_type={kind!r}: only plain RoPE ('default') is "
                                    f"supported (no YaRN, linear or dynamic scaling)")
        theta = params.get("rope_theta", theta)
    return float(10000.0 if theta is None else theta)


def json_short(v, limit: int = 120) -> str:
    import json
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= limit else s[:limit] + "..."


def _field(hf: Mapping, key: str, where: str, default=None, required: bool = True):
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is not None or not required:
        return default
    raise HFCheckpointError(f"{where}: missing field {key!r}")


def config_from_hf(hf: Mapping, where: str = "config.json") -> MLAConfig:
    """The :class:`MLAConfig` of a transformers DeepSeek-V2/V3 ``config.json`` (a dict).

    Raises :class:`HFCheckpointError` naming ``where`` and the field for anything fedmla
    does not reproduce exactly: MoE layers, rope scaling, biases, another activation,
    a quantization config, dropout, a norm eps other than 1e-6.
    """
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise HFCheckpointError(f"{where}: model_type={mt!r}: fedmla imports {' or '.join(SUPPORTED_MODEL_TYPES)} "
                                f"checkpoints (MLA attention) only")
    n_layers = int(_field(hf, "num_hidden_layers", where))
    dense = _field(hf, "first_k_dense_replace", where, default=_FIRST_K_DENSE_DEFAULT[mt])
    if int(dense) < n_layers:
        raise HFCheckpointError(f"{where}: first_k_dense_replace={dense} < num_hidden_layers={n_layers}: MoE layers "
                                f"are not supported (every layer must be a dense MLP)")
    if "quantization_config" in hf:
        q = hf["quantization_config"]
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise HFCheckpointError(f"{where}: quantization_config (quant_method={method!r}): quantized weights are not "
                                f"supported; use a bf16/fp16/fp32 checkpoint")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFCheckpointError(f"{where}: {key}={hf[key]!r}: biases are not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFCheckpointError(f"{where}: hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
    heads = int(_field(hf, "num_attention_heads", where))
    # num_key_value_heads is not read: in MLA, kv_b_proj expands the latent into keys and
    # values for every one of num_attention_heads heads, whatever that field says.
    eps = float(hf.get("rms_norm_eps", 1e-6))
    if eps != _LATENT_NORM_EPS:
        raise HFCheckpointError(f"{where}: rms_norm_eps={eps}: only 1e-6 is supported (transformers' DeepSeek "
                                f"latent norms always use 1e-6, fedmla one eps for all norms)")
    dropout = hf.get("attention_dropout") or 0.0
    if float(dropout) != 0.0:
        raise HFCheckpointError(f"{where}: attention_dropout={dropout}: dropout is not supported")
    if hf.get("pretraining_tp") not in (None, 1):
        raise HFCheckpointError(f"{where}: pretraining_tp={hf['pretraining_tp']}: only 1 is supported")
    theta = _rope_theta(hf, where)
    q_lora = hf.get("q_lora_rank")
    fields = dict(
        vocab_size=_field(hf, "vocab_size", where), dim=_field(hf, "hidden_size", where), n_layers=n_layers,
        n_heads=heads, inter_dim=_field(hf, "intermediate_size", where),
        q_lora_rank=0 if q_lora is None else q_lora, kv_lora_rank=_field(hf, "kv_lora_rank", where),
        qk_nope_head_dim=_field(hf, "qk_nope_head_dim", where),
        qk_rope_head_dim=_field(hf, "qk_rope_head_dim", where), v_head_dim=_field(hf, "v_head_dim", where),
        max_seq_len=_field(hf, "max_position_embeddings", where), rope_theta=theta, norm_eps=eps,
        init_std=float(hf.get("initializer_range") or 0.02),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", _TIE_DEFAULT)),
    )
    if q_lora == 0:
        raise HFCheckpointError(f"{where}: q_lora_rank=0: transformers writes null for an uncompressed query")
    try:
        return MLAConfig(**fields)
    except ValueError as e:
        raise HFCheckpointError(f"{where}: the fields do not make a valid MLA model: {e}") from None


def hf_config_from_mla(cfg: MLAConfig, dtype: str = "float32", base: Mapping | None = None) -> dict:
    """A transformers ``config.json`` dict for ``cfg``.

    ``base`` (the config.json a run was imported from) is kept as it was apart from the
    fields fedmla owns and ``dtype``, so a model goes out as the same kind it came in as
    (tokens ids, MTP settings and the like survive); without it the result is a dense
    ``deepseek_v3`` config with plain interleaved RoPE.
    """
    heads = cfg.n_heads
    if cfg.heads_per_layer is not None:
        if len(set(cfg.heads_per_layer)) > 1:
            raise HFCheckpointError(f"model config: heads_per_layer={list(cfg.heads_per_layer)}: a model pruned to "
                                    f"different head counts per layer cannot be held by transformers' DeepSeek models")
        heads = cfg.heads_per_layer[0]
    out = dict(base) if base is not None else {
        "architectures": [ARCHITECTURES["deepseek_v3"]], "model_type": "deepseek_v3",
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "rope_interleave": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True,
        "num_nextn_predict_layers": 0,
    }
    mt = out.get("model_type", "deepseek_v3")
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    out.update(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=cfg.inter_dim,
        q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_word_embeddings,
        first_k_dense_replace=max(int(out.get("first_k_dense_replace") or 0), cfg.n_layers), dtype=dtype,
    )
    out.setdefault("architectures", [ARCHITECTURES[mt]])
    out.pop("torch_dtype", None)     # transformers < 5 spelling of dtype
    if "rope_parameters" in out or "rope_theta" not in out:
        out["rope_parameters"] = rope
    if "rope_theta" in out:
        out["rope_theta"] = cfg.rope_theta
    return out


def _rope_perm(d: int) -> torch.Tensor:
    """Index p with interleaved[k] = half[p[k]]: pair j is (j, j + d/2) in the half layout."""
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()


def _interleaved(hf: Mapping) -> bool:
    """Whether the checkpoint's rope rows are laid out in adjacent pairs (fedmla's layout)."""
    return hf.get("model_type") != "deepseek_v3" or bool(hf.get("rope_interleave", True))


def _permute_rope_rows(w: torch.Tensor, heads: int, head_dim: int, start: int, idx: torch.Tensor) -> torch.Tensor:
    """Reorder the rows [start, start + len(idx)) of each of ``heads`` row blocks of size head_dim."""
    w = w.view(heads, head_dim, *w.shape[1:]).clone()
    w[:, start:start + idx.numel()] = w[:, start:start + idx.numel()][:, idx]
    return w.view(heads * head_dim, *w.shape[2:])


def _names(cfg: MLAConfig) -> dict[str, str]:
    """fedmla name -> HF name for every tensor of ``cfg``'s model."""
    out = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    attn = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
            "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
    ffn = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    q_names = ("wq",) if cfg.q_lora_rank == 0 else ("wq_a", "q_norm", "wq_b")
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        out[p + "attn_norm.weight"] = h + "input_layernorm.weight"
        out[p + "ffn_norm.weight"] = h + "post_attention_layernorm.weight"
        for n in (*q_names, "wkv_a", "kv_norm", "wkv_b", "wo"):
            out[f"{p}attn.{n}.weight"] = f"{h}self_attn.{attn[n]}.weight"
        for n, m in ffn.items():
            out[f"{p}ffn.{n}.weight"] = f"{h}mlp.{m}.weight"
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = "lm_head.weight"
    return out


def _permute(state: dict[str, torch.Tensor], cfg: MLAConfig, inverse: bool) -> dict[str, torch.Tensor]:
    dr, qk = cfg.qk_rope_head_dim, cfg.qk_head_dim
    idx = _rope_perm(dr)
    if inverse:
        idx = torch.argsort(idx)
    q_name = "wq" if cfg.q_lora_rank == 0 else "wq_b"
    out = dict(state)
    for i in range(cfg.n_layers):
        p = f"layers.{i}.attn."
        out[p + q_name + ".weight"] = _permute_rope_rows(state[p + q_name + ".weight"], cfg.layer_heads(i), qk,
                                                         cfg.qk_nope_head_dim, idx)
        out[p + "wkv_a.weight"] = _permute_rope_rows(state[p + "wkv_a.weight"], 1, cfg.kv_lora_rank + dr,
                                                     cfg.kv_lora_rank, idx)
    return out


def state_from_hf(hf_state: Mapping[str, torch.Tensor], cfg: MLAConfig, hf: Mapping,
                  where: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """fedmla's state dict from a transformers one, tensors unchanged in dtype and value
    (apart from the rope-row permutation of a ``rope_interleave: false`` checkpoint).

    Missing or unexpected tensors and wrong shapes are refused, naming them. A tied
    checkpoint may carry a redundant ``lm_head.weight`` equal to the embedding.
    """
    from .model import parameter_shapes
    names = _names(cfg)
    hf_keys = set(hf_state)
    extra = sorted(hf_keys - set(names.values()))
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        if not torch.equal(hf_state["lm_head.weight"], hf_state.get("model.embed_tokens.weight", torch.empty(0))):
            raise HFCheckpointError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from "
                                    f"model.embed_tokens.weight; set tie_word_embeddings false in config.json")
        extra.remove("lm_head.weight")
    missing = sorted(set(names.values()) - hf_keys)
    if missing or extra:
        hint = ""
        if any(".mlp.experts." in k or ".mlp.gate." in k for k in extra):
            hint = " (MoE expert weights: MoE layers are not supported)"
        elif any(k.startswith(f"model.layers.{cfg.n_layers}.") for k in extra):
            hint = " (layers past num_hidden_layers, e.g. multi-token-prediction modules, are not supported)"
        raise HFCheckpointError(f"{where}: tensor names do not match a dense {hf.get('model_type')} model: "
                                f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                                f"unexpected {extra[:6]}{'...' if len(extra) > 6 else ''}{hint}")
    shapes = parameter_shapes(cfg)
    state = {}
    for ours, theirs in names.items():
        t = hf_state[theirs]
        if tuple(t.shape) != shapes[ours]:
            raise HFCheckpointError(f"{where}: {theirs} has shape {tuple(t.shape)}, config.json implies "
                                    f"{shapes[ours]}")
        if not t.is_floating_point():
            raise HFCheckpointError(f"{where}: {theirs} has dtype {t.dtype}; only floating-point weights are supported")
        state[ours] = t
    return state if _interleaved(hf) else _permute(state, cfg, inverse=False)


def state_to_hf(state: Mapping[str, torch.Tensor], cfg: MLAConfig, hf: Mapping) -> dict[str, torch.Tensor]:
    """The transformers state dict of fedmla's ``state`` for the config.json dict ``hf``
    (the inverse of :func:`state_from_hf`; a tied model writes no ``lm_head``)."""
    names = _names(cfg)
    missing = sorted(set(names) - set(state))
    if missing:
        raise HFCheckpointError(f"model state lacks {missing[:6]}")
    st = dict(state) if _interleaved(hf) else _permute(dict(state), cfg, inverse=True)
    return {names[k]: st[k] for k in names}
