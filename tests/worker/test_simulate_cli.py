"""`fedmla simulate` end to end: Ray actors, real gRPC over loopback, in-process coordinator."""

import json

from typer.testing import CliRunner

from fedmla.worker.apps.cli import app


def test_simulate_four_clients_three_rounds(tmp_path):
    import torch
    out = tmp_path / "sim.json"
    threads = torch.get_num_threads()
    r = CliRunner().invoke(app, ["simulate", "--clients", "4", "--clients-per-round", "2", "--rounds", "3",
                                 "--local-steps", "4", "--actors", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    # the run's coordinator and evaluation used one torch thread; the caller's count is back
    assert torch.get_num_threads() == threads
    res = json.loads(out.read_text())
    assert res["rounds"] == 3
    assert res["final_val_loss"] < res["initial_val_loss"]
    assert res["bytes_up"] > 0 and res["bytes_down"] > 0
    # Every client that took part ends on the coordinator's weights (its last download is a
    # codec chain checked against the model hash); one never sampled downloads nothing.
    for name, c in res["clients"].items():
        if c["rounds"]:
            assert c["hash"] == res["coordinator_hash"], (name, c)
        else:   # never sampled (no download), or trained for a round that closed without it (synced at the end)
            assert c["hash"] in (None, res["coordinator_hash"]), (name, c)
    assert sum(c["rounds"] for c in res["clients"].values()) == 3 * 2
    # the clients were placed on the actors from the coordinator's seeded sampling, known
    # ahead: what each actor was predicted to run is what it ran
    predicted = res["placement"]["sampled_per_actor"]
    assert len(predicted) == 3 and all(sum(row) == 2 for row in predicted)
    assert [sum(c["rounds"] for c in res["clients"].values() if c["actor"] == i) for i in range(2)] == \
        [sum(row[i] for row in predicted) for i in range(2)]
    assert sorted(res["placement"]["clients_per_actor"]) == [2, 2]
    # The codec is on: uplink far below FedAvg's fp32 deltas.
    assert res["bytes_up"] * 10 < res["fedavg_fp32_bytes_up"]
    assert res["client_rounds"] == 6 and res["train_seconds"] > 0
    # total bytes (both ways, first downloads and catch-ups included) and uplink-only, both reported
    total = res["bytes_up"] + res["bytes_down"]
    assert res["total_ratio_vs_fedavg_fp32"] == res["fedavg_fp32_bytes"] / total
    assert res["uplink_ratio_vs_fedavg_fp32"] == res["fedavg_fp32_bytes_up"] / res["bytes_up"]
    assert "fewer bytes than FedAvg fp32, total" in r.output


def test_simulate_is_reproducible_from_its_seed(tmp_path):
    """Two runs of the same command end on the same model hash: which clients a round
    samples does not depend on who joined first."""
    hashes, sampled = [], []
    for i in range(2):
        out = tmp_path / f"sim{i}.json"
        r = CliRunner().invoke(app, ["simulate", "--clients", "4", "--clients-per-round", "2", "--rounds", "2",
                                     "--local-steps", "2", "--actors", "2", "--seed", "3", "--json", str(out)])
        assert r.exit_code == 0, r.output
        res = json.loads(out.read_text())
        hashes.append(res["coordinator_hash"])
        sampled.append(sorted((n, c["rounds"]) for n, c in res["clients"].items()))
    assert hashes[0] == hashes[1] and sampled[0] == sampled[1]


def test_simulate_refuses_bad_partition():
    r = CliRunner().invoke(app, ["simulate", "--partition", "zipf"])
    assert r.exit_code == 2 and "zipf" in r.output


def test_simulate_with_a_measured_baseline(tmp_path):
    """--baseline runs the same clients through the uncompressed pipeline and reports both
    runs' measured bytes side by side."""
    out = tmp_path / "sim.json"
    r = CliRunner().invoke(app, ["simulate", "--clients", "2", "--clients-per-round", "2", "--rounds", "1",
                                 "--local-steps", "2", "--actors", "2", "--baseline", "diloco", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    base = res["baseline"]
    assert base["name"] == "diloco" and base["rounds"] == 1
    assert base["initial_val_loss"] == res["initial_val_loss"]        # the same seeded model and validation set
    # fp32 dense updates: at least FedAvg fp32's uplink (plus framing), far above the codec's
    assert base["bytes_up"] >= res["fedavg_fp32_bytes_up"] > 10 * res["bytes_up"]
    assert base["bytes_total"] == base["bytes_up"] + base["bytes_down"]
    assert res["ratio_vs_baseline"]["total"] == base["bytes_total"] / res["bytes_total"]
    assert base["coordinator_hash"] != res["coordinator_hash"]
    assert "DiLoCo fp32 (measured)" in r.output


def test_simulate_refuses_unknown_baseline_and_baseline_with_external_coordinator():
    r = CliRunner().invoke(app, ["simulate", "--baseline", "fedprox"])
    assert r.exit_code == 2 and "fedprox" in r.output
    r = CliRunner().invoke(app, ["simulate", "--baseline", "fedavg", "--coordinator", "127.0.0.1:1"])
    assert r.exit_code == 2 and "--coordinator" in r.output
