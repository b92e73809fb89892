"""The model's attention modes go through the kernels and agree with each other."""

import torch

from fedmla.mla_model import MLAConfig, MLATransformer
from fedmla.mla_model.attention import mla_absorbed_attention_torch, mla_attention_torch
from kernels_testlib import rel_err, generator


def test_model_attention_functions_match_triton():
    g = generator(0)
    B, T, H, dn, dr, dv, c = 2, 9, 3, 16, 8, 16, 32
    q, kn = torch.randn(B, T, H, dn + dr, generator=g), torch.randn(B, T, H, dn, generator=g)
    kp, v = torch.randn(B, T, dr, generator=g), torch.randn(B, T, H, dv, generator=g)
    a = mla_attention_torch(q, kn, kp, v, 0.2)
    b = mla_attention_torch(q, kn, kp, v, 0.2, backend="triton")
    assert rel_err(a, b) <= 1e-3
    ql, qp = torch.randn(B, 1, H, c, generator=g), torch.randn(B, 1, H, dr, generator=g)
    kv, pe = torch.randn(B, T, c, generator=g), torch.randn(B, T, dr, generator=g)
    a = mla_absorbed_attention_torch(ql, qp, kv, pe, 0.2)
    b = mla_absorbed_attention_torch(ql, qp, kv, pe, 0.2, backend="triton")
    c_ = mla_absorbed_attention_torch(ql, qp, kv, pe, 0.2, backend="naive")
    assert a.shape == (B, 1, H, c) and rel_err(a, c_) <= 1e-3 and rel_err(b, c_) <= 1e-3


def test_naive_and_absorb_modes_agree_in_training_and_decode():
    torch.manual_seed(0)
    cfg = MLAConfig.preset("tiny")
    model = MLATransformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        naive = model(tokens)
        absorbed = model.set_attn_mode("absorb")(tokens)
        assert rel_err(absorbed, naive) <= 1e-3
        # Decode token by token through the latent cache (the decode kernel path).
        cache = model.new_cache(2, 12)
        model(tokens[:, :6], cache, 0)
        steps = [model(tokens[:, i:i + 1], cache, i)[:, -1] for i in range(6, 12)]
    assert rel_err(torch.stack(steps, 1), naive[:, 6:]) <= 1e-3


def test_training_backward_through_dispatched_attention():
    torch.manual_seed(0)
    model = MLATransformer(MLAConfig.preset("tiny"))
    tokens = torch.randint(0, 256, (2, 17))
    model.loss(tokens).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.layers[0].attn.wkv_b.weight.grad.abs().sum() > 0
