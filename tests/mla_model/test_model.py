import copy

import pytest
import torch

from fedmla.mla_model import LatentCache, MLAConfig, MLATransformer, mla_cache_bytes_per_token


def make(q_lora_rank=32, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MLAConfig.preset("tiny", q_lora_rank=q_lora_rank, **kw)
    model = MLATransformer(cfg)
    # Larger weights than the 0.02 init so attention patterns are far from uniform.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    return model.eval()


def tokens(B=2, T=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g)


@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_state_dict_keys_follow_deepseek_v3(q_lora_rank):
    keys = set(make(q_lora_rank).state_dict())
    q = {"wq"} if q_lora_rank == 0 else {"wq_a", "q_norm", "wq_b"}
    expected = {"embed.weight", "norm.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attn_norm.weight", f"layers.{i}.ffn_norm.weight"}
        expected |= {f"layers.{i}.attn.{n}.weight" for n in q | {"wkv_a", "kv_norm", "wkv_b", "wo"}}
        expected |= {f"layers.{i}.ffn.{n}.weight" for n in ("w1", "w2", "w3")}
    assert keys == expected
    m = make(q_lora_rank)
    assert m.embed.weight.data_ptr() == dict(m.named_parameters())["embed.weight"].data_ptr()
    assert not any("bias" in k for k in keys)


def test_output_shape_and_input_checks():
    m = make()
    assert m(tokens()).shape == (2, 37, 256)
    with pytest.raises(ValueError, match="int64"):
        m(tokens().int())
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_absorb_equals_naive_full_sequence(q_lora_rank):
    m = make(q_lora_rank)
    x = tokens()
    with torch.no_grad():
        naive = m(x)
        absorbed = m.set_attn_mode("absorb")(x)
    assert m.cfg.attn_mode == "absorb"
    assert (naive - absorbed).abs().max().item() <= 1e-5
    assert naive.abs().max() > 1.0  # the comparison is not between near-zero logits


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_cached_decoding_matches_full_recompute(mode):
    m = make().set_attn_mode(mode)
    x = tokens(B=2, T=20)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(batch=2, max_len=20)
        steps = [m(x[:, :5], cache, 0)]  # prefill 5 tokens, then one at a time
        for t in range(5, 20):
            steps.append(m(x[:, t:t + 1], cache, t))
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-5


def test_generate_greedy_matches_argmax_of_full_forward():
    m = make().set_attn_mode("absorb")
    prompt = tokens(B=1, T=6)
    out = m.generate(prompt, max_new_tokens=8)
    assert out.shape == (1, 14)
    with torch.no_grad():
        logits = m(out[:, :-1])
    assert torch.equal(out[0, 6:], logits[0, 5:].argmax(-1))


def test_cache_holds_only_latent_and_rope_key():
    m = make()
    cfg = m.cfg
    for dtype, size in [(torch.float32, 4), (torch.bfloat16, 2)]:
        cache = LatentCache.empty(cfg, batch=1, max_len=50, dtype=dtype)
        assert cache.nbytes() == 50 * mla_cache_bytes_per_token(cfg, size)
        assert mla_cache_bytes_per_token(cfg, size) == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * size
    with pytest.raises(ValueError, match="cache holds 4 tokens"):
        with torch.no_grad():
            m(tokens(B=1, T=5), m.new_cache(1, 4), 0)


@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_gate_zero_head_has_no_effect_whatever_its_weights(mode):
    m = make().set_attn_mode(mode)
    x = tokens()
    head, layer = 2, 1
    m.layers[layer].attn.head_gate[head] = 0.0
    with torch.no_grad():
        before = m(x)
        attn = m.layers[layer].attn
        cfg = m.cfg
        qk, kv = cfg.qk_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim
        attn.wq_b.weight[head * qk:(head + 1) * qk].normal_(0, 5.0)
        attn.wkv_b.weight[head * kv:(head + 1) * kv].normal_(0, 5.0)
        attn.wo.weight[:, head * cfg.v_head_dim:(head + 1) * cfg.v_head_dim].normal_(0, 5.0)
        after = m(x)
        attn.head_gate[head] = 1.0
        ungated = m(x)
    assert torch.equal(before, after)
    assert (ungated - before).abs().max() > 1e-3  # the head does matter when its gate is open


def test_train_mode_gradients_flow_to_all_parameters():
    m = make().train()
    m.loss(tokens(T=17)).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("small", {}), ("tiny", {"q_lora_rank": 0}),
                                              ("tiny", {"heads_per_layer": [4, 2]}),
                                              ("tiny", {"tie_word_embeddings": False})])
def test_parameter_shapes_match_the_model(preset, overrides):
    from fedmla.mla_model import parameter_shapes
    cfg = MLAConfig.preset(preset, **overrides)
    with torch.device("meta"):
        model = MLATransformer(cfg)
    assert parameter_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
