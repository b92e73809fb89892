"""The kernel benchmark runs end to end on tiny shapes and reports consistent figures
(no timing is asserted: speed lives in the JSON, not in the tests)."""

import json
import os

from typer.testing import CliRunner

from fedmla.worker.apps.cli import app
from fedmla.worker.apps.bench_kernels import run_benchmarks
from fedmla.mla_model.config import MLAConfig


def test_run_benchmarks_tiny():
    res = run_benchmarks("tiny", seq_lens=(16,), contexts=(32, 64), batch=2, decode_batch=3, repeats=1)
    cfg = MLAConfig.preset("tiny")
    (att,) = res["attention_fwd_bwd"]
    assert att["T"] == 16 and all(att[k] > 0 for k in ("naive_ms", "sdpa_math_ms", "dispatched_ms", "mha_sdpa_ms"))
    for row, S in zip(res["decode"], (32, 64)):
        assert row["context"] == S
        H, dqk, dv = cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim
        assert row["naive_cache"]["cache_bytes"] == 3 * S * H * (dqk + dv) * 4
        assert row["absorbed_latent"]["cache_bytes"] == 3 * S * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
        assert row["mha_equal_width"]["cache_bytes"] == 3 * S * 2 * cfg.dim * 4
        assert row["absorbed_latent"]["tokens_per_s"] > 0
    assert res["targets"]["attention_speedup_vs_math_at_1024"] is None  # T=1024 not run
    # throughput figures follow from the shapes and the measured times
    H, dqk, dv = cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim
    assert att["fwd_bwd_flops"] == 3 * 2 * 2 * H * (16 * 17 // 2) * (dqk + dv)
    assert abs(att["dispatched_tflop_per_s"] - att["fwd_bwd_flops"] / att["dispatched_ms"] / 1e9) < 1e-9
    for row in res["decode"]:
        lat = row["absorbed_latent"]
        assert abs(row["absorbed_cache_gb_per_s"] - lat["cache_bytes"] / lat["step_ms"] / 1e6) < 1e-9


def test_cli_writes_json(tmp_path):
    path = tmp_path / "k.json"
    result = CliRunner().invoke(app, ["bench", "kernels", "--json", str(path), "--preset", "tiny",
                                      "--seq-lens", "8", "--contexts", "16", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert data["machine"]["device"].startswith(os.environ.get("FEDMLA_TEST_DEVICE", "cpu"))
    assert data["decode"][0]["context"] == 16
    bad = CliRunner().invoke(app, ["bench", "kernels", "--seq-lens", "a,b"])
    assert bad.exit_code != 0
