"""The numbers the dashboard derives, checked against values computed by hand."""

import math

import pytest

import dashboard_runs as runs
from fedmla.coordinator.dashboard.source import ClientRecord, ClientRoundRecord, HeadImportanceRecord, RoundRecord, RunRecord
from fedmla.coordinator.dashboard.views import (client_views, head_importance_view, open_frontier, perplexity, round_views,
                                         run_view, summary)


def test_round_views_cumulative_bytes_ratios_durations_perplexity():
    rounds = [
        RoundRecord(id=1, status="completed", started_at=100.0, ended_at=104.5, bytes_up=100, bytes_down=300,
                    fedavg_fp32_bytes=8000, train_loss=2.0, val_loss=math.log(10.0)),
        RoundRecord(id=2, status="completed", started_at=110.0, ended_at=111.0, bytes_up=50, bytes_down=50,
                    fedavg_fp32_bytes=2000),
        RoundRecord(id=3, status="running", started_at=120.0, bytes_up=0, bytes_down=500, fedavg_fp32_bytes=None),
    ]
    v = round_views(rounds)
    assert [r.duration_seconds for r in v] == [4.5, 1.0, None]
    assert [r.bytes_total for r in v] == [400, 100, 500]
    assert [r.cum_bytes_up for r in v] == [100, 150, 150]
    assert [r.cum_bytes_down for r in v] == [300, 350, 850]
    assert [r.cum_bytes_total for r in v] == [400, 500, 1000]
    assert [r.fedavg_ratio for r in v] == [80.0, 40.0, None]  # uplink against uplink
    assert [r.cum_fedavg_fp32_bytes for r in v] == [8000, 10000, None]  # unknown once any round lacks it
    assert [r.cum_fedavg_ratio for r in v] == [80.0, 10000 / 150, None]
    assert v[0].val_perplexity == pytest.approx(10.0)
    assert v[0].train_perplexity == pytest.approx(math.e ** 2)
    assert v[1].val_perplexity is None and v[1].train_perplexity is None


def test_total_ratio_counts_the_fp32_model_down_to_every_sampled_client():
    # model of 1000 fp32 bytes; round 2 has no replies (the model size carries over)
    rounds = [
        RoundRecord(id=1, status="committed", sampled=3, replied=2, bytes_up=20, bytes_down=80, fedavg_fp32_bytes=2000),
        RoundRecord(id=2, status="failed", sampled=2, replied=0, bytes_up=0, bytes_down=100, fedavg_fp32_bytes=0),
        RoundRecord(id=3, status="committed", sampled=2, replied=2, bytes_up=30, bytes_down=70, fedavg_fp32_bytes=2000),
    ]
    v = round_views(rounds)
    assert [r.fedavg_fp32_bytes_down for r in v] == [3000, 2000, 2000]
    assert [r.total_fedavg_ratio for r in v] == [50.0, 20.0, 40.0]
    assert [r.cum_fedavg_fp32_bytes_total for r in v] == [5000, 7000, 11000]
    assert v[-1].cum_total_fedavg_ratio == pytest.approx(11000 / 300)
    assert v[-1].cum_fedavg_ratio == pytest.approx(4000 / 50)        # uplink only, unchanged
    # no round with replies yet: the model size, hence the total reference, is unknown
    first = round_views([RoundRecord(id=1, status="failed", sampled=2, replied=0, bytes_down=10, fedavg_fp32_bytes=0)])
    assert first[0].fedavg_fp32_bytes_down is None and first[0].cum_total_fedavg_ratio is None


def test_diverged_losses_become_null_not_nan():
    v = round_views([RoundRecord(id=0, status="completed", train_loss=float("nan"), val_loss=float("inf"))])[0]
    assert v.train_loss is None and v.val_loss is None and v.train_perplexity is None and v.val_perplexity is None
    assert perplexity(800.0) is None  # would overflow exp()
    assert perplexity(0.0) == 1.0


def test_ratio_undefined_when_nothing_was_sent():
    v = round_views([RoundRecord(id=0, status="failed", bytes_down=500, fedavg_fp32_bytes=1000)])[0]
    assert v.fedavg_ratio is None and v.cum_fedavg_ratio is None


def test_client_views_take_the_latest_round_row():
    clients = [ClientRecord(name="a", status="idle"), ClientRecord(name="b", status="new")]
    latest = [ClientRoundRecord(round_id=4, client="a", local_loss=1.5, num_examples=10, rejection_reason="bad shape")]
    a, b = client_views(clients, latest)
    assert (a.last_round, a.local_loss, a.num_examples, a.rejection_reason) == (4, 1.5, 10, "bad shape")
    assert (b.last_round, b.local_loss, b.rejection_reason) == (None, None, None)


def test_summary_of_the_example_run():
    final = [s for s in runs.steps() if s.round.ended_at is not None]
    views = round_views([s.round for s in final])
    s = summary(7, runs.run_record(), views, final[-1].clients)
    assert (s.version, s.run_id, s.rounds_total, s.rounds_ended, s.current_round) == (7, runs.RUN_ID, 3, 3, 3)
    assert s.last_val_loss == 2.75 and s.best_val_loss == 2.75 and s.last_train_loss == 2.7
    assert s.cum_bytes_up == 2500 * 3 + 3000 * 2 + 2000 * 2 and s.cum_bytes_down == 6000 * 9
    assert s.cum_fedavg_fp32_bytes == runs.MODEL_FP32_BYTES * (3 + 2 + 2)
    assert s.cum_fedavg_ratio == pytest.approx(runs.MODEL_FP32_BYTES * 7 / 17_500)
    assert s.clients_by_status == {"joined": 3}


def test_open_frontier():
    done = RoundRecord(id=1, status="committed", started_at=0, ended_at=1)
    running = RoundRecord(id=2, status="running", started_at=2)
    done2 = RoundRecord(id=2, status="committed", started_at=2, ended_at=3)
    done3 = RoundRecord(id=3, status="failed", started_at=3, ended_at=4)
    running4 = RoundRecord(id=4, status="running", started_at=4)
    assert open_frontier([]) == 0
    assert open_frontier([done]) == 1                     # the newest ended rounds may still gain a val loss
    assert open_frontier([done, running]) == 1
    assert open_frontier([done, done2, done3]) == 2       # ... the newest two of them
    assert open_frontier([done, done2, done3, running4]) == 2
    assert open_frontier([RoundRecord(id=0, status="running")]) == 0


def test_run_view_model_summary_from_preset_and_from_fields():
    from fedmla.mla_model.cli import model_info
    from fedmla.mla_model.config import MLAConfig

    v = run_view(RunRecord(run_id="r", config={"model": {"preset": "tiny", "n_layers": 3}}))  # a model section
    expected = model_info(MLAConfig.preset("tiny", n_layers=3))
    assert v.model.parameters == expected["mla"]["parameters"]
    assert v.model.kv_cache_bytes_per_token == expected["mla"]["kv_cache_bytes_per_token"]
    assert v.model.n_layers == 3 and v.model_error is None

    fields = MLAConfig.preset("small").model_dump()
    v = run_view(RunRecord(run_id="r", config={"preset": "tiny"}, mla_config=fields))  # as the store records it
    assert v.model.parameters == model_info(MLAConfig.preset("small"))["mla"]["parameters"]
    assert v.mla_config == fields


def test_run_view_reports_a_bad_model_config_and_tolerates_none():
    v = run_view(RunRecord(run_id="r", config={"model": {"preset": "tiny", "qk_rope_head_dim": 7}}))
    assert v.model is None and "qk_rope_head_dim must be even" in v.model_error
    v = run_view(RunRecord(run_id="r", config={"rounds": 3}))
    assert v.model is None and v.model_error is None


def test_head_importance_view_ragged_rows_mask_count_and_nan():
    rec = HeadImportanceRecord(round_id=2, scores=[[0.5, float("nan"), 0.1], [0.9]], mask=[[True, False, True], [True]])
    v = head_importance_view(rec)
    assert (v.n_layers, v.n_heads, v.active_heads) == (2, 3, 3)
    assert v.scores == [[0.5, None, 0.1], [0.9]]
    assert head_importance_view(HeadImportanceRecord(round_id=0, scores=[[1.0]])).active_heads is None
