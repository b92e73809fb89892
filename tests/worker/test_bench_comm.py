"""A miniature `bench comm` run: fields present, bytes counted from real messages, hashes checked."""

import json

from typer.testing import CliRunner

from fedmla.protos.codec import CodecConfig
from fedmla.worker.apps.bench_comm import BenchConfig, run_bench
from fedmla.worker.trainer import TrainerConfig


def micro_config(**codec):
    return BenchConfig(preset="tiny", num_clients=2, rounds=2, max_bytes_per_client=8_000, eval_windows_per_client=2,
                       trainer=TrainerConfig(local_steps=2, batch_size=2, seq_len=16, warmup_steps=0, total_steps=4),
                       codec=CodecConfig(**codec))


def test_micro_bench_fields_and_byte_accounting():
    out = run_bench(micro_config(rank=1), log=lambda s: None)
    base, fed = out["baseline"], out["fedmla"]
    assert base["rounds"] == 2
    per_round_fp32 = 2 * 2 * out["fp32_model_message_bytes"]            # up + down, 2 clients
    assert abs(base["bytes_total"] - 2 * per_round_fp32) < 200           # + num_examples fields
    assert 1 <= fed["rounds_to_target"] <= 4
    assert fed["bytes_to_target"] == sum(sum(r["up_bytes"]) + sum(r["down_bytes"]) for r in fed["per_round"])
    assert fed["bytes_to_target"] * 20 < base["bytes_total"] * fed["rounds_to_target"] / 2
    assert all(r["hash_ok"] for r in fed["per_round"])
    assert out["ratio"] == base["bytes_total"] / fed["bytes_to_target"]
    assert isinstance(out["reached_target"], bool)
    json.dumps(out)


def test_cli_with_folder_data(tmp_path):
    from fedmla.worker.apps.cli import app

    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "t.txt").write_text(f"{name} says hello to the world. " * 200)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(micro_config().model_dump_json())
    res = CliRunner().invoke(app, ["bench", "comm", "--config", str(cfg), "--data", str(tmp_path / "data"),
                                   "--json", str(tmp_path / "out.json"), "--no-ablation"])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["data"]["clients"] == ["a", "b"]
    for key in ("baseline", "fedmla", "ratio", "reached_target"):
        assert key in out
    # bad data: a clear message and exit code 2, no traceback
    (tmp_path / "data" / "c").mkdir()
    res = CliRunner().invoke(app, ["bench", "comm", "--config", str(cfg), "--data", str(tmp_path / "data"),
                                   "--json", str(tmp_path / "out.json"), "--no-ablation"])
    assert res.exit_code == 2 and "client 'c'" in res.output and "Traceback" not in res.output
