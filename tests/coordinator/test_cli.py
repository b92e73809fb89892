"""`fedmla coordinator` as a process (config file + flags, SIGTERM, metrics, refusal of a
corrupt store) and `fedmla token ...`."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from fedmla.protos.codec import CodecConfig

from fedmla.coordinator.settings import load_settings
from fedmla.coordinator.testing import start_coordinator_process
from fedmla.protos.transport import CoordinatorClient

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "fedmla.worker.apps.cli", *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("coordinator:\n  clients_per_round: 5\n  min_replies: 3\n  codec: {rank: 6, keep_ratio: 0.75}\n")
    s = load_settings(cfg, min_replies=4, port=0)
    assert (s.clients_per_round, s.min_replies, s.port) == (5, 4, 0)
    assert (s.codec.rank, s.codec.keep_ratio) == (6, 0.75)
    assert s.codec.factor_bits == CodecConfig().factor_bits and s.codec.replicate_momentum   # unset: defaults
    # the retired dense mode's settings are refused, each with what replaces it
    with pytest.raises(ValueError, match=r"codec_extra \(use the codec's own fields"):
        load_settings(cfg, codec_extra={"warm_start": "true"})
    with pytest.raises(ValueError, match=r"rank \(use codec.rank\)"):
        load_settings(cfg, rank=4)
    with pytest.raises(ValueError, match=r"updates \(the codec is the only pipeline; plain FedAvg is --codec fedavg"):
        load_settings(cfg, updates="dense")
    (tmp_path / "old.yaml").write_text("aggregator: fedavg\nserver_lr: 0.5\n")
    with pytest.raises(ValueError, match=r"aggregator \(aggregator plug-ins are gone.*server_lr \(use codec.outer_lr\)"):
        load_settings(tmp_path / "old.yaml")
    # FedAvg and DiLoCo are presets of the codec
    assert load_settings(cfg, codec="fedavg").codec == CodecConfig.fedavg()
    assert load_settings(cfg, codec="diloco").codec.outer == "nesterov"
    with pytest.raises(ValueError, match="unknown codec preset 'fedsgd'"):
        load_settings(cfg, codec="fedsgd")
    (tmp_path / "badcodec.json").write_text(json.dumps({"codec": {"rank": 0}}))
    with pytest.raises(ValueError, match="codec.rank"):
        load_settings(tmp_path / "badcodec.json")
    (tmp_path / "bad.json").write_text(json.dumps({"clients_per_round": 1, "min_replies": 2}))
    with pytest.raises(ValueError, match="min_replies"):
        load_settings(tmp_path / "bad.json")
    (tmp_path / "typo.toml").write_text("clients_per_rnd = 3\n")
    with pytest.raises(ValueError, match="clients_per_rnd"):
        load_settings(tmp_path / "typo.toml")


def test_process_tokens_metrics_and_sigterm(tmp_path):
    store = tmp_path / "store"
    token = cli("token", "create", "--client", "w1", "--store", str(store)).stdout.strip()
    cfg = tmp_path / "coord.toml"
    cfg.write_text('preset = "tiny"\nclients_per_round = 1\nmetrics_port = 0\n')
    proc, port = start_coordinator_process(store, ["--config", str(cfg), "--metrics-port", "0"], tmp_path / "log")
    try:
        with CoordinatorClient(f"127.0.0.1:{port}", token, timeout=20) as c:
            assert c.join(num_examples=3).client_id == "w1"
        # revoke from another process while the coordinator runs
        assert "revoked 1" in cli("token", "revoke", "--client", "w1", "--store", str(store)).stdout
        assert "revoked" in cli("token", "list", "--store", str(store)).stdout
        import grpc
        with CoordinatorClient(f"127.0.0.1:{port}", token, timeout=20) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.get_task()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "shutting down" in (tmp_path / "log").read_text()


def test_metrics_endpoint_serves_prometheus_text(tmp_path):
    from fedmla.coordinator.inprocess import BackgroundCoordinator
    from fedmla.coordinator.testing import settings_for
    with BackgroundCoordinator(settings_for(tmp_path, metrics_port=0)) as bg:
        body = urllib.request.urlopen(f"http://127.0.0.1:{bg.server.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("fedmla_rounds_total", "fedmla_clients", "fedmla_bytes_total", "fedmla_rejections_total",
                 "fedmla_aggregation_seconds"):
        assert name in body


def test_corrupt_store_refused_at_start_with_clear_error(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "fedmla.sqlite").write_bytes(b"\x00garbage" * 512)
    r = cli("coordinator", "--store", str(store), "--port", "0", check=False)
    assert r.returncode == 2
    assert "refusing" in r.stderr.lower() or "refusing" in r.stdout.lower()
    assert (store / "fedmla.sqlite").read_bytes() == b"\x00garbage" * 512


def test_bad_flag_value_named(tmp_path):
    r = cli("coordinator", "--store", str(tmp_path / "s"), "--codec", '{"factor_bits": 5}', check=False)
    assert r.returncode != 0 and "factor_bits" in (r.stderr + r.stdout)
    r = cli("coordinator", "--store", str(tmp_path / "s"), "--min-replies", "9", check=False)
    assert r.returncode != 0 and "min_replies" in (r.stderr + r.stdout)
