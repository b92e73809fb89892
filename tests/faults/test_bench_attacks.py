"""`fedmla bench attacks`: the pieces with known answers, and a tiny end-to-end matrix."""

import pytest

from fedmla.coordinator.defenses import DefenseConfig
from fedmla.worker.apps.bench_attacks import AttackBenchConfig, alie_z, run_attack_bench
from fedmla.worker.trainer import TrainerConfig


def test_alie_z_matches_the_papers_formula():
    # n = 13, f = 3: s = floor(13/2 + 1) - 3 = 4 supporters, z = Phi^-1(9/13) ~ 0.5024
    assert alie_z(13, 3) == pytest.approx(0.50240, abs=1e-4)
    # n = 11, f = 1: s = 6 - 1 = 5, z = Phi^-1(6/11) ~ 0.1142
    assert alie_z(11, 1) == pytest.approx(0.11419, abs=1e-4)


def test_tiny_matrix_reports_every_cell_and_the_defence_holds_against_scaling():
    cfg = AttackBenchConfig(honest=4, attackers=[1], attacks=["scaled", "inflated_importance"], rounds=2,
                            trainer=TrainerConfig(local_steps=2, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2,
                                                  total_steps=4),
                            defense=DefenseConfig(kind="median"), boost=1000.0, max_bytes_per_client=8_000)
    out = run_attack_bench(cfg, log=lambda s: None)
    cells = {c["attack"]: c for c in out["cells"]}
    assert set(cells) == {"scaled", "inflated_importance"} and all(c["fraction"] == 0.2 for c in cells.values())
    scaled = cells["scaled"]
    # a 1000x boosted update wrecks the plain mean; the coordinate-wise median ignores it
    assert scaled["undefended"]["final_val_loss"] > 1.05 * out["clean_val_loss"]
    assert scaled["defended"]["within_5pct"]
    imp = cells["inflated_importance"]
    # without the defence the liar's heads fill the top of the mask; with it only exploration can pick them
    layers = imp["undefended"]["mask_heads_attacked"] // 2
    assert imp["undefended"]["mask_heads_taken"] == imp["undefended"]["mask_heads_attacked"]
    # With the defence the liars no longer fill the mask. (Not "at most one explorer per layer":
    # the attacked heads are the honest clients' least wanted at round 0, and honest training
    # can lift one of them into the top-k by the last round.)
    assert imp["defended"]["mask_heads_taken"] < imp["undefended"]["mask_heads_taken"]
    assert imp["defended"]["mask_heads_taken"] <= layers + 1
