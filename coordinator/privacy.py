"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018).

Each client's update is clipped to L2 norm ``clip_norm`` (see ``fedmla.coordinator.robust``);
the coordinator adds Gaussian noise of standard deviation
``noise_multiplier * clip_norm / expected_clients`` to the average, and an RDP
accountant (Opacus) tracks epsilon at ``delta`` with sampling rate
clients_per_round / population. A round that would push epsilon past
``target_epsilon`` is refused before it starts.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


def _rdp_accountant():
    # Opacus pulls in a lot (about a second of imports): only DP runs pay for it.
    from opacus.accountants import RDPAccountant
    return RDPAccountant()


class DPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clip_norm: float = Field(1.0, gt=0, description="per-client L2 clipping bound of the update")
    noise_multiplier: float = Field(1.0, gt=0, description="noise std as a multiple of clip_norm")
    target_epsilon: float = Field(8.0, gt=0, description="privacy budget; rounds beyond it are refused")
    delta: float = Field(1e-5, gt=0, lt=1)


class BudgetExceeded(RuntimeError):
    """Starting another round would exceed the configured privacy budget."""


class PrivacyAccountant:
    """Tracks the (epsilon, delta) spent by DP rounds; its history can be saved and restored."""

    def __init__(self, cfg: DPConfig, history: list[tuple[float, float, int]] | None = None):
        self.cfg = cfg
        self._acc = _rdp_accountant()
        if history:
            self._acc.history = [tuple(h) for h in history]

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """[(noise_multiplier, sample_rate, steps), ...] — JSON-serialisable state."""
        return [tuple(h) for h in self._acc.history]

    @property
    def rounds(self) -> int:
        return sum(int(h[2]) for h in self._acc.history)

    def epsilon(self) -> float:
        if not self._acc.history:
            return 0.0
        return float(self._acc.get_epsilon(self.cfg.delta))

    def epsilon_if_run(self, sample_rate: float) -> float:
        """Epsilon after one more round at ``sample_rate``, without recording it."""
        trial = _rdp_accountant()
        trial.history = list(self._acc.history)
        trial.step(noise_multiplier=self.cfg.noise_multiplier, sample_rate=sample_rate)
        return float(trial.get_epsilon(self.cfg.delta))

    def check_round(self, sample_rate: float) -> float:
        """Raise BudgetExceeded if one more round would exceed the budget; else the epsilon it would reach."""
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        eps = self.epsilon_if_run(sample_rate)
        if eps > self.cfg.target_epsilon:
            raise BudgetExceeded(
                f"round {self.rounds + 1} would spend epsilon {eps:.3f} > target_epsilon {self.cfg.target_epsilon} "
                f"(delta={self.cfg.delta}, noise_multiplier={self.cfg.noise_multiplier}, sample_rate={sample_rate:.4f})"
            )
        return eps

    def record_round(self, sample_rate: float) -> float:
        self._acc.step(noise_multiplier=self.cfg.noise_multiplier, sample_rate=sample_rate)
        return self.epsilon()


def add_gaussian_noise(aggregate: dict[str, torch.Tensor], cfg: DPConfig, expected_clients: int,
                       generator: torch.Generator) -> dict[str, torch.Tensor]:
    """aggregate + N(0, (noise_multiplier * clip_norm / expected_clients)^2) on every coordinate."""
    if expected_clients < 1:
        raise ValueError(f"expected_clients must be >= 1, got {expected_clients}")
    std = cfg.noise_multiplier * cfg.clip_norm / expected_clients
    out = {}
    for name in sorted(aggregate):
        t = aggregate[name]
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64) * std
        out[name] = (t.double() + noise).to(t.dtype)
    return out
