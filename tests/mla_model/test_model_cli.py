import json

from typer.testing import CliRunner

from fedmla.worker.apps.cli import app
from fedmla.mla_model import MLAConfig, mla_cache_bytes_per_token


def test_model_info_json_reports_mla_beside_mha():
    r = CliRunner().invoke(app, ["model", "info", "--preset", "small", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    cfg = MLAConfig.preset("small")
    assert info["mla"]["kv_cache_bytes_per_token"] == mla_cache_bytes_per_token(cfg, 2)
    assert info["mha"]["kv_cache_bytes_per_token"] == 2 * cfg.n_heads * (cfg.dim // cfg.n_heads) * cfg.n_layers * 2
    assert info["mla"]["parameters"] > 5_000_000
    assert info["kv_cache_ratio"] < 0.5


def test_model_info_table_and_bad_preset():
    runner = CliRunner()
    r = runner.invoke(app, ["model", "info", "--preset", "tiny"])
    assert r.exit_code == 0 and "KV cache bytes/token" in r.output
    r = runner.invoke(app, ["model", "info", "--preset", "nope"])
    assert r.exit_code != 0 and "unknown preset" in r.output
