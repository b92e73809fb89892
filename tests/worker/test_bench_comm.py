"""Miniature `bench comm` runs: fields present, every byte counted from real messages
(first downloads, catch-ups, head lists, uplinks), sampling shared by the methods."""

import json

import pytest
from typer.testing import CliRunner

from fedmla.protos.codec import CodecConfig
from fedmla.worker.apps.bench_comm import BenchConfig, first_reaching, run_bench, sample_clients
from fedmla.worker.trainer import TrainerConfig


def micro_config(num_clients=2, clients_per_round=None, rounds=2, seed=0, **codec):
    return BenchConfig(preset="tiny", num_clients=num_clients, clients_per_round=clients_per_round, rounds=rounds,
                       seed=seed,
                       max_bytes_per_client=8_000, eval_windows_per_client=2,
                       trainer=TrainerConfig(local_steps=2, batch_size=2, seq_len=16, warmup_steps=0,
                                             total_steps=2 * rounds),
                       codec=CodecConfig(**codec))


@pytest.fixture(scope="module")
def partial():
    """4 clients, 2 per round, 3 baseline rounds. Seed 1 samples a, d / b, d / a, d: b joins
    late (round 1), a misses round 1."""
    return run_bench(micro_config(num_clients=4, clients_per_round=2, rounds=3, seed=1, rank=1), log=lambda s: None)


def _method_rounds(out):
    return {"fedavg": out["baselines"]["fedavg"]["per_round"], "diloco": out["baselines"]["diloco"]["per_round"],
            "fedmla": out["fedmla"]["per_round"]}


def test_keys_and_ratios(partial):
    out = partial
    json.dumps(out)
    for name in ("fedavg", "diloco"):
        b = out["baselines"][name]
        assert b["rounds"] == 3 and {"final_val_loss", "bytes_total", "per_round"} <= set(b)
        assert out["ratio_vs"][name] == b["bytes_total"] / out["fedmla"]["targets"][name]["bytes"]
        assert out["ratio_vs_tight"][name] == b["bytes_total"] / out["fedmla"]["tight_targets"][name]["bytes"]
        assert isinstance(out["reached_target_vs"][name], bool)
        assert isinstance(out["reached_target_vs_tight"][name], bool)
    assert out["ratio"] == out["ratio_vs"]["fedavg"] and out["reached_target"] == out["reached_target_vs"]["fedavg"]
    assert out["fedmla"]["rounds"] <= 9                       # tight cap 3R
    assert all(r["hash_ok"] for rows in _method_rounds(out).values() for r in rows)


def test_every_byte_is_counted(partial):
    fp32 = partial["fp32_model_message_bytes"]
    for method, rows in _method_rounds(partial).items():
        held, late, missed = {}, None, None
        for row in rows:
            assert len(row["clients"]) == 2
            # per client: catch-up payload + the round's head lists; the uplink separately
            assert row["down_bytes"] == [c["bytes"] + row["head_list_bytes"] for c in row["catchup"]]
            for c in row["catchup"]:
                if c["kind"] == "chain":      # exactly the stored downlinks it replays
                    start = 0 if c["from"] is None else c["from"]
                    assert c["downlinks"] == row["round"] - start
                    assert c["bytes"] == sum(rows[v]["downlink_message_bytes"] for v in range(start, row["round"]))
                else:
                    assert c["kind"] == "full" and c["bytes"] == row["full_state_bytes"]
                assert c["from"] == held.get(c["client"])      # what it trained from last time
                if c["from"] is None and row["round"] > 0:
                    late = late or c
                if c["from"] is not None and row["round"] - c["from"] > 1:
                    missed = missed or c
                held[c["client"]] = row["round"]
            assert min(row["up_bytes"]) > 0
        assert rows[-1]["bytes_cum"] == sum(sum(r["up_bytes"]) + sum(r["down_bytes"]) for r in rows)
        assert late is not None and missed is not None, "no late joiner / missed round: catch-up untested"
        if method != "fedmla":
            # uncompressed: a late joiner or a client back after a miss pays one fp32 model
            assert missed["kind"] == "full"            # two fp32 downlinks cost more than one state
            assert late["bytes"] >= fp32 and missed["bytes"] >= fp32
            assert all(min(r["up_bytes"]) >= fp32 for r in rows)
        else:
            assert late["kind"] == "chain" and 0 < late["bytes"] < fp32 / 5
            assert missed["kind"] == "chain" and missed["downlinks"] == 2
    # the same clients in the same rounds for every method
    clients = [[r["clients"] for r in rows[:3]] for rows in _method_rounds(partial).values()]
    assert clients[0] == clients[1] == clients[2]


def test_sampling_and_first_reaching():
    names = [f"c{i}" for i in range(16)]
    assert sample_clients(names, None, 0, 5) == names
    rounds = [sample_clients(names, 4, 0, r) for r in range(8)]
    assert all(len(s) == 4 and len(set(s)) == 4 and s == sorted(s, key=names.index) for s in rounds)
    assert rounds == [sample_clients(names, 4, 0, r) for r in range(8)]
    assert len({tuple(s) for s in rounds}) > 1
    res = {"per_round": [{"round": i, "val_loss": v, "bytes_cum": 10 * (i + 1)} for i, v in enumerate([3, 2, 1])]}
    assert first_reaching(res, 2.0, 3) == {"target": 2.0, "reached": True, "rounds": 2, "bytes": 20, "val_loss": 2}
    assert first_reaching(res, 1.0, 2) == {"target": 1.0, "reached": False, "rounds": 2, "bytes": 20, "val_loss": 2}


def test_cli_with_folder_data_and_bad_options(tmp_path):
    from fedmla.worker.apps.cli import app

    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "t.txt").write_text(f"{name} says hello to the world. " * 200)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(micro_config().model_dump_json())
    base = ["bench", "comm", "--config", str(cfg), "--json", str(tmp_path / "out.json"), "--no-ablation"]
    res = CliRunner().invoke(app, base + ["--data", str(tmp_path / "data")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["data"]["clients"] == ["a", "b"]
    for key in ("baselines", "fedmla", "ratio_vs", "reached_target_vs", "ratio_vs_tight", "ratio", "reached_target"):
        assert key in out
    # --reuse-baselines: the same baselines, only the codec runs again
    res = CliRunner().invoke(app, base + ["--data", str(tmp_path / "data"), "--reuse-baselines",
                                          str(tmp_path / "out.json"), "--codec", '{"rank": 2}',
                                          "--compare", '{"method": "topk", "topk_k": 8}'])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "out.json").read_text())
    (topk,) = out["compare"]
    assert topk["changes"] == {"rank": 2, "method": "topk", "topk_k": 8}
    for name in ("fedavg", "diloco"):       # against the same baselines as the main codec run
        t = topk["targets"][name]
        assert t["target"] == out["fedmla"]["targets"][name]["target"]
        assert topk["ratio_vs"][name] == out["baselines"][name]["bytes_total"] / t["bytes"]
        assert isinstance(topk["reached_target_vs"][name], bool)
    assert topk["per_round"][0]["up_bytes"][0] != out["fedmla"]["per_round"][0]["up_bytes"][0]
    res = CliRunner().invoke(app, base + ["--compare", '{"method": "nope"}'])
    assert res.exit_code == 2 and "method" in res.output
    # bad options: a clear message and exit code 2, no traceback
    res = CliRunner().invoke(app, base + ["--clients", "2", "--clients-per-round", "3"])
    assert res.exit_code == 2 and "clients_per_round (3) exceeds the number of clients (2)" in res.output
    (tmp_path / "data" / "c").mkdir()
    res = CliRunner().invoke(app, base + ["--data", str(tmp_path / "data")])
    assert res.exit_code == 2 and "client 'c'" in res.output and "Traceback" not in res.output


def test_reuse_accepts_a_saved_config_without_fields_added_since():
    """A JSON written before a BenchConfig field existed is the same configuration as that
    field's default; any other difference (or a config that no longer validates) is not."""
    from fedmla.worker.apps.bench_comm import _comparable, _with_defaults

    cfg = micro_config()
    now = _comparable(json.loads(cfg.model_dump_json()))
    saved = json.loads(cfg.model_dump_json())
    del saved["model_dir"]                                  # added after the run was saved
    saved["codec"] = CodecConfig(rank=3).model_dump()        # the codec is not compared
    assert _comparable(_with_defaults(saved, cfg)) == now
    assert _comparable(_with_defaults({**saved, "rounds": 3}, cfg)) != now
    assert _with_defaults({**saved, "no_such_field": 1}, cfg) == {}
