import pytest
import torch

from fedmla.coordinator.privacy import BudgetExceeded, DPConfig, PrivacyAccountant, add_gaussian_noise


def test_epsilon_grows_and_budget_refuses_the_round_that_would_exceed_it():
    cfg = DPConfig(noise_multiplier=1.0, target_epsilon=5.0, delta=1e-5)
    acc = PrivacyAccountant(cfg)
    assert acc.epsilon() == 0.0
    eps = []
    with pytest.raises(BudgetExceeded, match="target_epsilon 5.0"):
        for _ in range(1000):
            acc.check_round(0.1)
            eps.append(acc.record_round(0.1))
    assert all(b > a for a, b in zip(eps, eps[1:]))
    assert len(eps) >= 3 and eps[-1] <= 5.0 and acc.epsilon_if_run(0.1) > 5.0
    assert acc.rounds == len(eps)


def test_history_restores_the_same_epsilon():
    cfg = DPConfig(noise_multiplier=1.3)
    a = PrivacyAccountant(cfg)
    for _ in range(5):
        a.record_round(0.05)
    b = PrivacyAccountant(cfg, history=[list(h) for h in a.history])
    assert b.epsilon() == pytest.approx(a.epsilon()) and b.rounds == 5


def test_noise_has_the_configured_std():
    cfg = DPConfig(clip_norm=2.0, noise_multiplier=1.5)
    agg = {"w": torch.zeros(200_000)}
    out = add_gaussian_noise(agg, cfg, expected_clients=10, generator=torch.Generator().manual_seed(0))
    assert out["w"].std().item() == pytest.approx(1.5 * 2.0 / 10, rel=0.02)
    with pytest.raises(ValueError, match="sample_rate"):
        PrivacyAccountant(cfg).check_round(0.0)
