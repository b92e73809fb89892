"""Flower's simulation runtime (Ray backend, a private local Ray instance Flower shuts down)
runs 2 rounds of the fedmla strategy and 2 rounds of Flower's own FedAvg on the same
model, data and trainer (4 virtual SuperNodes, tiny MLA, 10 local steps)."""

import pytest

from fedmla.worker.flower import FlowerConfig, run_flower_simulation

ROUNDS, NODES = 2, 4


@pytest.fixture(scope="module")
def runs():
    base = FlowerConfig(rounds=ROUNDS, num_nodes=NODES).with_rounds(ROUNDS)
    fedmla = run_flower_simulation(base.model_copy(update={"clients_per_round": 3}))
    fedavg = run_flower_simulation(base.model_copy(update={"strategy": "fedavg"}))
    return fedmla, fedavg


def test_fedmla_strategy_completes_two_rounds_bit_identical_everywhere(runs):
    fed, _ = runs
    assert fed["strategy"] == "fedmla" and fed["rounds"] == ROUNDS
    assert fed["hash_ok"] == [True] * ROUNDS
    for r in fed["per_round"]:
        assert r["aggregated"] == 3 and not r["rejected"]
        # every node that took part reconstructed exactly the coordinator's weights
        assert sorted(r["client_hashes"]) == sorted(r["nodes"])
        assert set(r["client_hashes"].values()) == {r["global_hash"]}
    assert fed["per_round"][-1]["global_hash"] == fed["global_hash"]
    assert fed["final_val_loss"] < fed["initial_val_loss"] - 0.5


def test_fedmla_sends_far_fewer_bytes_than_fedavg(runs):
    fed, avg = runs
    fp32 = fed["fp32_model_message_bytes"]
    for r in fed["per_round"]:
        assert len(r["up_bytes"]) == 3
        assert max(r["up_bytes"].values()) < fp32 / 10
        assert max(r["down_bytes"].values()) < fp32 / 5
    assert fed["bytes_total"] * 10 < fed["fedavg_fp32_bytes_total"]
    assert fed["bytes_total"] * 10 < avg["bytes_total"]


def test_flower_fedavg_baseline_on_the_same_model_and_data(runs):
    fed, avg = runs
    assert avg["strategy"] == "fedavg" and avg["rounds"] == ROUNDS
    assert avg["initial_val_loss"] == pytest.approx(fed["initial_val_loss"], abs=0)   # same init, same windows
    assert avg["data"] == fed["data"] and avg["model_parameters"] == fed["model_parameters"]
    assert avg["final_val_loss"] < avg["initial_val_loss"] - 0.5
    fp32 = avg["fp32_model_message_bytes"]
    for r in avg["per_round"]:
        assert len(r["up_bytes"]) == len(r["down_bytes"]) == NODES
        for b in list(r["up_bytes"].values()) + list(r["down_bytes"].values()):
            assert abs(b - fp32) < 0.02 * fp32          # a full fp32 model each way, each node
    assert avg["bytes_total"] == pytest.approx(avg["fedavg_fp32_bytes_total"], rel=0.02)
