"""Headless Chromium watches a live 3-round run on the dashboard.

The structure, so that the feeder can later be swapped for a real `fedmla simulate`:

1. ``live_run(kind)`` starts a dashboard over an empty run and returns a :class:`LiveRun`:
   its URL (with token) and ``start()``, which makes rounds happen in the background.
   Today a thread writes the example run of ``dashboard_runs`` step by step (round
   started, round ended) into an InMemorySource or a SQLite store, as a coordinator
   would. A real simulation only needs another ``LiveRun``: start ``fedmla simulate
   --rounds 3`` with its dashboard on port 0 and report that URL.
2. The browser opens the page before any round exists, the run starts, and the test
   waits for the third round to have ended on the page.
3. Everything on the page is compared with the JSON API of the same server (which is
   what makes the checks valid for any run), then a few facts of the example run are
   checked against the hand-made values in ``dashboard_runs``.
4. A full-page screenshot is saved as ``artifacts/dashboard.png`` (CI keeps it).

Chromium is Debian's (``bash deploy/install.sh`` installs it); the test fails, and
does not skip, when it is missing.
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import dashboard_runs as runs
from coordinator.dashboard import DashboardServer
from coordinator.dashboard.sqlite_source import SqliteSource

ROOT = Path(__file__).resolve().parents[3]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = Path(os.environ.get("FEDMLA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
TOKEN = "browser-test-token"
WAIT_MS = 90_000  # generous: the machine is shared; this bounds a hang, it is not a speed check


@dataclass
class LiveRun:
    url: str                                    # the page, token included
    api: httpx.Client                           # the same server's JSON API, authorised
    start: callable = field(repr=False)         # make the rounds happen, in the background


@contextmanager
def live_run(kind: str, directory: Path):
    """A dashboard over an empty run whose three rounds start when ``start()`` is called."""
    if kind == "memory":
        writer = runs.MemoryWriter()
        source = writer.source
    else:
        writer = runs.SqliteWriter(directory / "store")  # the coordinator's schema as is: no mask column
        source = SqliteSource(writer.root)
    server = DashboardServer(source, port=0, token=TOKEN, poll_interval=0.1).start()
    failure: list[BaseException] = []

    def feed():
        try:
            for step in runs.steps(3, t0=time.time() - 40):  # recent, so "last seen" reads naturally
                time.sleep(0.3)  # pacing only, so the page lives through each state
                writer.write(step)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            failure.append(e)

    feeder = threading.Thread(target=feed, name="dashboard-feeder", daemon=True)
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    try:
        yield LiveRun(url=f"{server.url}?token={TOKEN}", api=api, start=feeder.start)
    finally:
        if feeder.ident is not None:  # started
            feeder.join(60)
        api.close()
        server.stop()
        source.close()
        writer.close()
        if failure:
            raise failure[0]


@contextmanager
def chromium(profile_dir: Path):
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `bash deploy/install.sh` (as root it installs "
                    "Debian's chromium and chromium-driver), or point FEDMLA_CHROMIUM at a Chromium binary",
                    pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile_dir), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 1000})
        try:
            yield context
        finally:
            context.close()


# JS run in the page: each chart's traces as drawn by plotly (gd.data).
CHART_DATA = """() => Object.fromEntries(
  ["chart-loss", "chart-perplexity", "chart-clients", "chart-duration", "chart-bytes", "chart-cumulative", "chart-heatmap"]
    .map(id => [id, (document.getElementById(id).data || []).map(t => ({name: t.name, x: Array.from(t.x || []),
                                                                          y: Array.from(t.y || []), z: t.z || null}))]))"""
ROUND_3_ON_PAGE = """() => { const d = window.fedmlaDashboard; const s = d && d.summary;
  return !!s && s.current_round === 3 && s.rounds_ended === 3 && d.hiRounds.length === 3
    && document.querySelectorAll('#clients-body tr').length === 3
    && document.getElementById('heat-round').textContent === '3'; }"""


def _approx_list(values):
    return [None if v is None else pytest.approx(v, rel=1e-12) for v in values]


def _fmt(x, digits):
    return "–" if x is None else f"{x:.{digits}f}"


def _fmt_bytes(n):
    if n < 1024:
        return f"{n} B"
    v, units = float(n), ["KiB", "MiB", "GiB", "TiB"]
    i = -1
    while v >= 1024 and i < len(units) - 1:
        v /= 1024
        i += 1
    return f"{v:.2f} {units[i]}"


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_browser_watches_a_live_three_round_run(kind, tmp_path):
    with live_run(kind, tmp_path) as run, chromium(tmp_path / "chromium-profile") as browser:
        page = browser.new_page()
        try:
            _watch_and_check(page, run, kind)
        except BaseException:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"dashboard-{kind}-failed.png"), full_page=True)
            raise


def _watch_and_check(page, run: LiveRun, kind: str) -> None:
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.goto(run.url)
    page.wait_for_function("() => window.fedmlaDashboard && window.fedmlaDashboard.updates >= 1", timeout=WAIT_MS)
    assert page.text_content("#card-round") == "–"  # opened before any round existed
    updates_before = page.evaluate("window.fedmlaDashboard.updates")

    run.start()
    page.wait_for_function(ROUND_3_ON_PAGE, timeout=WAIT_MS)
    assert page.evaluate("window.fedmlaDashboard.updates") > updates_before + 1, "the page was not updated live"
    assert page.text_content("#conn-status") == "live"

    summary = run.api.get("/api/summary").json()
    rounds = run.api.get("/api/rounds").json()
    clients = run.api.get("/api/clients").json()
    heat = run.api.get("/api/head-importance/latest").json()
    info = run.api.get("/api/run").json()

    # ---- cards ---------------------------------------------------------------------
    assert page.text_content("#run-id") == info["run_id"]
    assert page.text_content("#card-round") == "3"
    assert page.text_content("#card-val-loss") == _fmt(summary["last_val_loss"], 4)
    assert page.text_content("#card-val-ppl") == _fmt(summary["last_val_perplexity"], 2)
    assert page.text_content("#card-train-loss") == _fmt(summary["last_train_loss"], 4)
    assert page.text_content("#card-ratio") == f"{summary['cum_fedavg_ratio']:.1f}×"
    assert page.text_content("#card-bytes") == \
        f"{_fmt_bytes(summary['cum_bytes_up'])} / {_fmt_bytes(summary['cum_bytes_down'])}"

    # ---- charts: the numbers plotted are the API's, and plotly drew them ------------
    charts = page.evaluate(CHART_DATA)
    col = lambda key: [r[key] for r in rounds]  # noqa: E731
    ids = col("id")
    expected = {
        "chart-loss": [col("train_loss"), col("val_loss")],
        "chart-perplexity": [col("train_perplexity"), col("val_perplexity")],
        "chart-clients": [col("replied"), col("dropped"), col("rejected"), col("sampled")],
        "chart-duration": [col("duration_seconds"), col("aggregation_seconds")],
        "chart-bytes": [col("bytes_up"), col("bytes_down"), col("fedavg_fp32_bytes")],
        "chart-cumulative": [col("cum_bytes_up"), col("cum_bytes_total"), col("cum_fedavg_fp32_bytes"),
                             col("cum_fedavg_ratio")],
    }
    for chart, series in expected.items():
        traces = charts[chart]
        assert len(traces) == len(series), chart
        for trace, ys in zip(traces, series):
            assert trace["x"] == ids, (chart, trace["name"])
            assert trace["y"] == _approx_list(ys), (chart, trace["name"])
    assert page.locator("#chart-loss .scatterlayer .trace .points path").count() == 2 * len(rounds)
    assert page.locator("#chart-bytes .barlayer .point").count() == 2 * len(rounds)
    assert page.locator("#chart-clients .barlayer .point").count() >= len(rounds)

    # ---- heatmap: latest round's scores, inactive heads crossed out, slider --------
    heat_traces = charts["chart-heatmap"]
    assert heat_traces[0]["z"] == heat["scores"]
    masked = [(f"head {h}", f"layer {layer}") for layer, row in enumerate(heat["mask"] or [])
              for h, active in enumerate(row) if not active]
    assert list(zip(heat_traces[1]["x"], heat_traces[1]["y"])) == masked
    assert page.locator("#chart-heatmap .heatmaplayer image").count() == 1
    cell_text = page.locator("#chart-heatmap .heatmaplayer text").all_text_contents()
    assert cell_text[:len(heat["scores"][0])] == [f"{x:.3f}" for x in heat["scores"][0]]
    assert page.locator("#chart-heatmap .scatterlayer .points path").count() == len(masked)
    caption = page.text_content("#heat-caption")
    assert (f"{heat['active_heads']} of 8 heads active" if heat["mask"] else "no active-head mask recorded") in caption
    assert page.eval_on_selector("#heat-slider", "s => [s.max, s.value]") == ["2", "2"]

    page.eval_on_selector("#heat-slider", "s => { s.value = '0'; s.dispatchEvent(new Event('input')); }")
    page.wait_for_function("() => document.getElementById('heat-round').textContent === '1'", timeout=WAIT_MS)
    heat1 = run.api.get("/api/head-importance/1").json()
    page.wait_for_function("() => document.getElementById('heat-caption').textContent.includes('round 1,')",
                           timeout=WAIT_MS)
    assert page.evaluate(CHART_DATA)["chart-heatmap"][0]["z"] == heat1["scores"]

    # ---- tables ------------------------------------------------------------------
    for c in clients:
        row = page.locator(f'#clients-body tr[data-client="{c["name"]}"]')
        text = lambda key: row.locator(f'td[data-key="{key}"]').text_content()  # noqa: E731
        assert text("status") == c["status"]
        assert text("rounds_joined") == str(c["rounds_joined"])
        assert row.locator('td[data-key="bytes_up"]').get_attribute("data-value") == str(c["bytes_up"])
        assert row.locator('td[data-key="bytes_down"]').get_attribute("data-value") == str(c["bytes_down"])
        assert text("bytes_up") == _fmt_bytes(c["bytes_up"])
        assert text("local_loss") == _fmt(c["local_loss"], 4)
        assert text("last_round") == str(c["last_round"])
        assert text("rejection_reason") == (c["rejection_reason"] or "")
    assert page.locator("#rounds-body tr").count() == len(rounds)
    for r in rounds:
        row = page.locator(f'#rounds-body tr[data-round="{r["id"]}"]')
        assert row.locator('td[data-key="status"]').text_content() == r["status"]
        assert row.locator('td[data-key="val_loss"]').text_content() == _fmt(r["val_loss"], 4)
        assert row.locator('td[data-key="bytes_up"]').get_attribute("data-value") == str(r["bytes_up"])
        assert row.locator('td[data-key="reason"]').text_content() == (r["reason"] or "")

    # ---- model and config ----------------------------------------------------------
    assert page.text_content('#model-summary dd[data-key="parameters"]') == f"{info['model']['parameters']:,}"
    assert page.text_content('#model-summary dd[data-key="kv_cache_bytes_per_token"]').startswith(
        f"{info['model']['kv_cache_bytes_per_token']:,} ")
    assert f'"rank": {info["config"]["rank"]}' in page.text_content("#run-config")
    assert f'"kv_lora_rank": {info["mla_config"]["kv_lora_rank"]}' in page.text_content("#model-config")

    # ---- facts of the example run, by hand (replace when driving a real simulation) --
    assert [r["val_loss"] for r in rounds] == [runs.VAL_LOSS[i] for i in (1, 2, 3)]
    assert page.text_content("#card-val-loss") == "2.7500"
    assert page.text_content('#clients-body tr[data-client="client-b"] td[data-key="rejection_reason"]') == runs.REJECTION
    assert math.isclose(summary["cum_fedavg_ratio"], 7 * runs.MODEL_FP32_BYTES / 17_500)
    assert heat["mask"] == (runs.MASK[3] if kind == "memory" else None)  # the store records no mask (yet)
    assert len(masked) == (2 if kind == "memory" else 0)

    # ---- screenshot for CI -------------------------------------------------------
    page.eval_on_selector("#heat-slider", "s => { s.value = s.max; s.dispatchEvent(new Event('input')); }")
    page.wait_for_function("() => document.getElementById('heat-round').textContent === '3'", timeout=WAIT_MS)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / ("dashboard.png" if kind == "sqlite" else f"dashboard-{kind}.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page_errors == []
