import pytest
from pydantic import ValidationError

from fedmla.mla_model import PRESETS, MLAConfig, MLATransformer


@pytest.mark.parametrize("field,value", [
    ("qk_rope_head_dim", 7),
    ("kv_lora_rank", 0),
    ("q_lora_rank", -1),
    ("n_heads", 0),
    ("dim", -4),
    ("rope_theta", 0.0),
    ("attn_mode", "flash"),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValidationError) as err:
        MLAConfig.preset("tiny", **{field: value})
    assert field in str(err.value)


def test_unknown_field_is_refused():
    with pytest.raises(ValidationError, match="kv_rank"):
        MLAConfig(kv_rank=3)


def test_heads_per_layer_must_match_layers_and_heads():
    with pytest.raises(ValidationError, match="heads_per_layer"):
        MLAConfig.preset("tiny", heads_per_layer=(4,))
    with pytest.raises(ValidationError, match="heads_per_layer"):
        MLAConfig.preset("tiny", heads_per_layer=(4, 5))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        MLAConfig.preset("huge")


def test_small_preset_is_5_to_10m_parameters():
    n = MLATransformer(MLAConfig.preset("small")).num_parameters()
    assert 5_000_000 <= n <= 10_000_000


def test_presets_build():
    for name in PRESETS:
        cfg = MLAConfig.preset(name)
        assert cfg.softmax_scale == pytest.approx((cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5)
