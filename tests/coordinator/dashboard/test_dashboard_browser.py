"""Headless Chromium watches a live 3-round run on the dashboard.

1. ``live_run(kind)`` gives a :class:`LiveRun`: the dashboard's URL (with token), its
   JSON API, and ``start()``. Kind ``simulate`` is the real thing: a ``fedmla simulate
   --clients 4 --rounds 3 --dashboard-port 0`` subprocess (coordinator with its embedded
   dashboard, Ray actors, gRPC workers, the codec), whose dashboard URL the test reads
   from its output. Kinds ``sqlite`` and ``memory`` feed the hand-made example run of
   ``dashboard_runs`` step by step into a store / an in-memory source, which pins the
   exact numbers and the states a real run rarely shows (a dropout, a rejection).
2. The browser opens the page (for the example runs before any round exists), and the
   test waits for the third round to have ended on the page.
3. Everything on the page is compared with the JSON API of the same server (valid for
   any run); then the facts of the run: the simulation's own ``--json`` results, or the
   hand-made values of the example run.
4. A full-page screenshot of the real run is saved as ``artifacts/dashboard.png``
   (``$FEDMLA_ARTIFACTS`` overrides the folder; CI keeps it).

Chromium is Debian's (``bash deploy/install.sh`` installs it); the test fails, and
does not skip, when it is missing.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import dashboard_runs as runs
from fedmla.coordinator.dashboard import DashboardServer
from fedmla.coordinator.dashboard.sqlite_source import SqliteSource

ROOT = Path(__file__).resolve().parents[3]
ARTIFACTS = Path(os.environ.get("FEDMLA_ARTIFACTS", ROOT / "artifacts"))
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
    clients: int = 3
    results: callable = field(default=lambda: None, repr=False)   # simulate: its --json results


@contextmanager
def live_run(kind: str, directory: Path):
    """A dashboard of a three-round run (see the module docstring)."""
    if kind == "simulate":
        with _simulate_run(directory) as run:
            yield run
        return
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
def _simulate_run(directory: Path):
    """``fedmla simulate`` in a subprocess (its own session, killed by process group at the end)."""
    out_json, log_path = directory / "sim.json", directory / "simulate.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FEDMLA_DASHBOARD_TOKEN": TOKEN}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedmla.worker.apps.cli", "simulate", "--clients", "4",
                                 "--clients-per-round", "2", "--rounds", "3", "--local-steps", "4", "--actors", "2",
                                 "--dashboard-port", "0", "--dashboard-linger", "300", "--json", str(out_json)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = None
    try:
        deadline = time.monotonic() + WAIT_MS / 1000
        url = None
        while url is None:
            m = re.search(rb"dashboard: (http://127\.0\.0\.1:\d+/)", log_path.read_bytes())
            if m:
                url = m.group(1).decode()
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"fedmla simulate printed no dashboard URL (exit {proc.poll()}):\n"
                            f"{log_path.read_text(errors='replace')[-3000:]}", pytrace=False)
            else:
                time.sleep(0.05)
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

        def results():
            deadline = time.monotonic() + WAIT_MS / 1000
            while not out_json.exists() or not out_json.read_text().strip().endswith("}"):
                assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "simulate wrote no --json results"
                time.sleep(0.1)
            return json.loads(out_json.read_text())
        yield LiveRun(url=f"{url}?token={TOKEN}", api=api, start=lambda: None, clients=4, results=results)
    finally:
        if api is not None:
            api.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


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
ROUND_3_ON_PAGE = """(clients) => { const d = window.fedmlaDashboard; const s = d && d.summary;
  return !!s && s.current_round === 3 && s.rounds_ended === 3 && d.hiRounds.length === 3
    && document.querySelectorAll('#clients-body tr').length === clients
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


@pytest.mark.parametrize("kind", ["simulate", "sqlite", "memory"])
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
    if kind != "simulate":
        assert page.text_content("#card-round") == "–"  # opened before any round existed
    ended_at_open = page.evaluate("(window.fedmlaDashboard.summary || {}).rounds_ended || 0")
    updates_before = page.evaluate("window.fedmlaDashboard.updates")

    run.start()
    page.wait_for_function(ROUND_3_ON_PAGE, arg=run.clients, timeout=WAIT_MS)
    if ended_at_open < 3:   # the page saw rounds end after it opened: it was updated live
        assert page.evaluate("window.fedmlaDashboard.updates") > updates_before, "the page was not updated live"
    assert page.text_content("#conn-status") == "live"
    if kind == "simulate":
        # The run is over once its results exist; simulate records each model's held-out
        # loss just after the commit, so let the page catch up with the final state.
        run.results()
        final = run.api.get("/api/summary").json()
        page.wait_for_function("(v) => document.getElementById('card-val-loss').textContent === v",
                               arg=_fmt(final["last_val_loss"], 4), timeout=WAIT_MS)
        page.wait_for_function("(v) => window.fedmlaDashboard.summary.cum_bytes_up === v",
                               arg=final["cum_bytes_up"], timeout=WAIT_MS)

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
    assert summary["cum_total_fedavg_ratio"] is not None
    assert page.text_content("#card-ratio") == f"{summary['cum_total_fedavg_ratio']:.1f}×"
    assert page.text_content("#card-ratio-up") == f"up only: {summary['cum_fedavg_ratio']:.1f}×"
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
                             col("cum_fedavg_fp32_bytes_total"), col("cum_total_fedavg_ratio"),
                             col("cum_fedavg_ratio")],
    }
    for chart, series in expected.items():
        traces = charts[chart]
        assert len(traces) == len(series), chart
        for trace, ys in zip(traces, series):
            assert trace["x"] == ids, (chart, trace["name"])
            assert trace["y"] == _approx_list(ys), (chart, trace["name"])
    # one marker per known value (simulate measures the models it sees: two commits between two of
    # its polls leave the first without a held-out loss)
    points = sum(v is not None for v in col("train_loss") + col("val_loss"))
    assert points >= len(rounds) + 1
    assert page.locator("#chart-loss .scatterlayer .trace .points path").count() == points
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
        assert text("last_round") == ("–" if c["last_round"] is None else str(c["last_round"]))
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
    assert f'"rank": {info["config"]["codec"]["rank"]}' in page.text_content("#run-config")
    assert f'"kv_lora_rank": {info["mla_config"]["kv_lora_rank"]}' in page.text_content("#model-config")

    if kind == "simulate":
        _check_simulation_facts(run.results(), rounds, clients, summary, heat, masked)
    else:   # the hand-made example run
        assert [r["val_loss"] for r in rounds] == [runs.VAL_LOSS[i] for i in (1, 2, 3)]
        assert page.text_content("#card-val-loss") == "2.7500"
        assert page.text_content('#clients-body tr[data-client="client-b"] td[data-key="rejection_reason"]') == \
            runs.REJECTION
        assert math.isclose(summary["cum_fedavg_ratio"], 7 * runs.MODEL_FP32_BYTES / 17_500)
        assert heat["mask"] == (runs.MASK[3] if kind == "memory" else None)  # that example store has no mask column
        assert len(masked) == (2 if kind == "memory" else 0)

    # ---- screenshot for CI -------------------------------------------------------
    page.eval_on_selector("#heat-slider", "s => { s.value = s.max; s.dispatchEvent(new Event('input')); }")
    page.wait_for_function("() => document.getElementById('heat-round').textContent === '3'", timeout=WAIT_MS)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / ("dashboard.png" if kind == "simulate" else f"dashboard-{kind}.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page_errors == []


def _check_simulation_facts(res: dict, rounds: list, clients: list, summary: dict, heat: dict, masked: list) -> None:
    """The dashboard of the real run agrees with what `fedmla simulate --json` reported."""
    assert res["rounds"] == 3 and [r["status"] for r in rounds] == ["committed"] * 3
    # The held-out loss simulate measured for each committed model is the round's val_loss.
    measured = {p["version"]: p["val_loss"] for p in res["per_round"]}
    for r in rounds:
        if r["model_version"] in measured:
            assert r["val_loss"] == pytest.approx(measured[r["model_version"]], rel=1e-9)
    assert rounds[-1]["val_loss"] == pytest.approx(res["final_val_loss"], rel=1e-9)
    # Every uploaded byte reached the store; the codec kept it far below FedAvg's fp32 deltas.
    assert summary["cum_bytes_up"] == res["bytes_up"]
    assert summary["cum_fedavg_ratio"] > 10
    by_name = {c["name"]: c for c in clients}
    assert set(by_name) == set(res["clients"])
    for name, c in res["clients"].items():
        assert by_name[name]["rounds_joined"] == c["rounds"]
        assert by_name[name]["bytes_up"] == c["bytes_up"]
    # The codec's head mask of round 3: top half of each layer's heads plus one explored.
    L, H = len(heat["scores"]), len(heat["scores"][0])
    assert heat["mask"] is not None and len(heat["mask"]) == L and all(sum(row) == H // 2 + 1 for row in heat["mask"])
    assert len(masked) == L * (H - H // 2 - 1)
