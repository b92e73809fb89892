import pytest
import torch

from fedmla.mla_model import MLAConfig, MLATransformer, head_importance, normalize_per_layer, prune_heads


def make(seed=0, q_lora_rank=32):
    torch.manual_seed(seed)
    m = MLATransformer(MLAConfig.preset("tiny", q_lora_rank=q_lora_rank))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    return m


def batches(n=3, B=2, T=33, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (B, T), generator=g) for _ in range(n)]


def test_normalize_per_layer_hand_computed():
    raw = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    out = normalize_per_layer(raw)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 0.0]]))


def test_head_with_zero_output_columns_has_zero_importance():
    m = make()
    dv = m.cfg.v_head_dim
    with torch.no_grad():
        m.layers[0].attn.wo.weight[:, 1 * dv:2 * dv] = 0.0
    imp = head_importance(m, batches())
    assert imp.shape == (2, 4)
    assert imp[0, 1].item() == 0.0
    assert torch.isfinite(imp).all() and (imp >= 0).all()
    assert (imp[0, [0, 2, 3]] > 0).all() and (imp[1] > 0).all()
    # unit L2 norm per layer
    assert torch.allclose(imp.norm(dim=1), torch.ones(2), atol=1e-5)


def test_importance_leaves_weights_and_gates_untouched():
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    head_importance(m, batches(n=1))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(not g.requires_grad for g in m.head_gates())
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("q_lora_rank", [0, 32])
@pytest.mark.parametrize("mode", ["naive", "absorb"])
def test_pruning_gated_heads_leaves_logits_unchanged(q_lora_rank, mode):
    m = make(q_lora_rank=q_lora_rank).eval().set_attn_mode(mode)
    prune = {0: [1, 3], 1: [0]}
    mask = [[1, 0, 1, 0], [0, 1, 1, 1]]
    m.set_head_mask(mask)
    x = batches(n=1)[0]
    small = prune_heads(m, prune)
    assert small.cfg.heads_per_layer == (2, 3)
    assert small.num_parameters() < m.num_parameters()
    assert small.layers[0].attn.wo.weight.shape == (m.cfg.dim, 2 * m.cfg.v_head_dim)
    with torch.no_grad():
        assert (small(x) - m(x)).abs().max().item() <= 1e-6


def test_prune_rejects_bad_requests():
    m = make()
    with pytest.raises(ValueError, match="layer 0 has 4 heads"):
        prune_heads(m, {0: [4]})
    with pytest.raises(ValueError, match="every head of layer 1"):
        prune_heads(m, {1: [0, 1, 2, 3]})
