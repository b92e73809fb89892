"""Hugging Face DeepSeek-V2/V3 checkpoints in and out: fedmla's logits equal transformers'
on the same weights, export round trips bit for bit, and what is not mapped is refused."""

from __future__ import annotations

import json

import pytest
import torch

from hf_testlib import TINY, safetensors_tensors, save_checkpoint, transformers

from fedmla.mla_model import MLAConfig, MLATransformer
from fedmla.mla_model.hf import HFCheckpointError, config_from_hf, state_from_hf, state_to_hf
from fedmla.mla_model.hf_checkpoint import read_hf_checkpoint, write_hf_checkpoint

VARIANTS = [
    ("deepseek_v3", {}),
    ("deepseek_v3", {"rope_interleave": False}),
    ("deepseek_v3", {"q_lora_rank": None}),
    ("deepseek_v3", {"tie_word_embeddings": True}),
    ("deepseek_v2", {}),
    ("deepseek_v2", {"q_lora_rank": None, "tie_word_embeddings": True}),
]


def _tokens(vocab=TINY["vocab_size"], T=48, seed=1):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


def _fedmla(ckpt) -> MLATransformer:
    model = MLATransformer(ckpt.cfg).eval()
    model.load_state_dict(ckpt.state, strict=True)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("model_type,overrides", VARIANTS)
def test_logits_equal_transformers(tmp_path, model_type, overrides):
    ref = save_checkpoint(tmp_path, model_type, **overrides)
    ckpt = read_hf_checkpoint(tmp_path)
    assert ckpt.cfg.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    tokens = _tokens()
    with torch.no_grad():
        want = ref(tokens).logits
        got = _fedmla(ckpt)(tokens)
    assert want.abs().max() > 1.0          # logits of a size where a wrong layout shows
    assert _rel(got, want) < 1e-5, (_rel(got, want), float((got - want).abs().max()))


def test_rope_layout_matters(tmp_path):
    """The check above can fail: reading a rope_interleave=false checkpoint as if it were
    interleaved (no row permutation) changes the logits well beyond the tolerance."""
    ref = save_checkpoint(tmp_path, "deepseek_v3", rope_interleave=False)
    hf = json.loads((tmp_path / "config.json").read_text())
    wrong = {**hf, "rope_interleave": True}
    cfg = config_from_hf(wrong)
    state = state_from_hf(safetensors_tensors(tmp_path), cfg, wrong)
    model = MLATransformer(cfg).eval()
    model.load_state_dict(state)
    tokens = _tokens()
    with torch.no_grad():
        assert _rel(model(tokens), ref(tokens).logits) > 1e-3


def test_untied_head_is_used(tmp_path):
    save_checkpoint(tmp_path, "deepseek_v3")
    ckpt = read_hf_checkpoint(tmp_path)
    assert "lm_head.weight" in ckpt.state and not torch.equal(ckpt.state["lm_head.weight"], ckpt.state["embed.weight"])
    model = _fedmla(ckpt)
    tokens = _tokens()
    with torch.no_grad():
        before = model(tokens)
        model.lm_head.weight.mul_(2.0)
        assert torch.allclose(model(tokens), 2.0 * before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type,overrides", VARIANTS)
def test_export_round_trip_bit_for_bit(tmp_path, model_type, overrides):
    src, out = tmp_path / "src", tmp_path / "out"
    save_checkpoint(src, model_type, **overrides)
    ckpt = read_hf_checkpoint(src)
    write_hf_checkpoint(out, ckpt.state, ckpt.cfg, ckpt.hf_config, ckpt.dtypes, ckpt.files)
    a, b = safetensors_tensors(src), safetensors_tensors(out)
    if ckpt.cfg.tie_word_embeddings:
        a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert read_hf_checkpoint(out).cfg == ckpt.cfg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_round_trip(tmp_path, dtype):
    """A bf16/fp16 checkpoint is trained in fp32; written back in its own dtypes, the
    untrained weights come out bit for bit (the upcast is exact)."""
    src, out = tmp_path / "src", tmp_path / "out"
    save_checkpoint(src, "deepseek_v3", dtype=dtype)
    ckpt = read_hf_checkpoint(src)
    assert all(v.dtype == torch.float32 for v in ckpt.state.values())
    assert set(ckpt.dtypes.values()) == {str(dtype).removeprefix("torch.")}
    write_hf_checkpoint(out, ckpt.state, ckpt.cfg, ckpt.hf_config, ckpt.dtypes, ckpt.files)
    a, b = safetensors_tensors(src), safetensors_tensors(out)
    assert all(b[k].dtype == dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")


def test_sharded_checkpoint_with_index(tmp_path):
    ref = save_checkpoint(tmp_path, "deepseek_v3", shard=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    tokens = _tokens()
    with torch.no_grad():
        assert _rel(_fedmla(read_hf_checkpoint(tmp_path))(tokens), ref(tokens).logits) < 1e-5


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": 0}, {"tie_word_embeddings": False},
                                       {"heads_per_layer": [2, 2]}])
def test_preset_export_loads_in_transformers(tmp_path, overrides):
    """A model fedmla made itself goes out as a DeepseekV3ForCausalLM with no missing or
    unexpected keys and the same logits."""
    cfg = MLAConfig.preset("tiny", **overrides)
    model = MLATransformer(cfg).eval()
    model.reset_parameters(torch.Generator().manual_seed(3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    write_hf_checkpoint(tmp_path, model.state_dict(), cfg)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokens = _tokens(vocab=cfg.vocab_size)
    with torch.no_grad():
        assert _rel(model(tokens), hf.eval()(tokens).logits) < 1e-5


def test_uneven_pruned_model_is_not_exported(tmp_path):
    cfg = MLAConfig.preset("tiny", heads_per_layer=[4, 2])
    with pytest.raises(HFCheckpointError, match="heads_per_layer"):
        write_hf_checkpoint(tmp_path, MLATransformer(cfg).state_dict(), cfg)


def _config(kind="deepseek_v3", **kw) -> dict:
    """A dense tiny config.json dict as transformers writes it, with fields replaced."""
    cls = transformers.DeepseekV3Config if kind == "deepseek_v3" else transformers.DeepseekV2Config
    cfg = cls(**TINY).to_dict()
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("field,value,message", [
    ("first_k_dense_replace", 1, "first_k_dense_replace=1 < num_hidden_layers=2: MoE layers are not supported"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}, "rope_parameters.rope_type='yarn'"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling="),
    ("attention_bias", True, "attention_bias=True: biases are not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("model_type", "llama", "model_type='llama'"),
    ("rms_norm_eps", 1e-5, "rms_norm_eps=1e-05"),
    ("quantization_config", {"quant_method": "fp8"}, "quantization_config"),
    ("attention_dropout", 0.1, "attention_dropout=0.1"),
])
def test_unsupported_configs_are_refused_naming_the_field(field, value, message):
    with pytest.raises(HFCheckpointError, match="config.json: .*" + _re(message)):
        config_from_hf(_config(**{field: value}), "config.json")


def test_v2_default_is_moe_and_refused():
    cfg = _config("deepseek_v2")
    del cfg["first_k_dense_replace"]          # transformers' DeepseekV2 default: 0 dense layers
    with pytest.raises(HFCheckpointError, match="first_k_dense_replace=0 < num_hidden_layers=2"):
        config_from_hf(cfg)
    with pytest.raises(HFCheckpointError, match="mlp_bias"):
        config_from_hf(_config("deepseek_v2", mlp_bias=True))


def test_bad_weights_are_refused_naming_the_tensor(tmp_path):
    save_checkpoint(tmp_path, "deepseek_v3")
    hf = json.loads((tmp_path / "config.json").read_text())
    cfg = config_from_hf(hf)
    tensors = safetensors_tensors(tmp_path)
    extra = {**tensors, "model.layers.1.mlp.experts.0.gate_proj.weight": torch.zeros(2, 2)}
    with pytest.raises(HFCheckpointError, match="unexpected .*experts.*MoE"):
        state_from_hf(extra, cfg, hf)
    missing = {k: v for k, v in tensors.items() if "o_proj" not in k}
    with pytest.raises(HFCheckpointError, match="missing .*o_proj"):
        state_from_hf(missing, cfg, hf)
    wrong = {**tensors, "model.norm.weight": torch.ones(65)}
    with pytest.raises(HFCheckpointError, match=r"model.norm.weight has shape \(65,\)"):
        state_from_hf(wrong, cfg, hf)
    mtp = {**tensors, "model.layers.2.input_layernorm.weight": torch.ones(64)}
    with pytest.raises(HFCheckpointError, match="past num_hidden_layers"):
        state_from_hf(mtp, cfg, hf)


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(HFCheckpointError, match="does not exist"):
        read_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HFCheckpointError, match=r"config.json: not valid JSON"):
        read_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(HFCheckpointError, match="no \\*.safetensors .*pickle"):
        read_hf_checkpoint(tmp_path)


def test_state_mapping_is_invertible_for_rope_half_layout():
    hf = _config(rope_interleave=False)
    cfg = config_from_hf(hf)
    ours = {k: torch.randn(v.shape) for k, v in MLATransformer(cfg).state_dict().items()}
    back = state_from_hf(state_to_hf(ours, cfg, hf), cfg, hf)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    # and the permutation really moves the rope rows
    assert not torch.equal(state_to_hf(ours, cfg, hf)["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"],
                           ours["layers.0.attn.wkv_a.weight"])


def _re(s: str) -> str:
    import re
    return re.escape(s)
