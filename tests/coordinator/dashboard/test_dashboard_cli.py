"""`fedmla dashboard --store PATH`: a finished run's store, served read-only with no coordinator."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from typer.testing import CliRunner

import dashboard_runs as runs
from fedmla.worker.apps.cli import app

ROOT = Path(__file__).resolve().parents[3]


def _error(*args) -> tuple[int, str]:
    """Exit code and the error text with rich's box and line wrapping taken out."""
    r = CliRunner().invoke(app, ["dashboard", *args])
    return r.exit_code, " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())


def test_bad_store_paths_are_named(tmp_path):
    code, text = _error("--store", str(tmp_path / "missing-store"))
    assert code == 2 and "Invalid value for --store: store not found:" in text and "missing-store" in text
    code, text = _error("--store", str(tmp_path))
    assert code == 2 and "fedmla.sqlite missing" in text
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"\x00garbage" * 100)
    code, text = _error("--store", str(junk))
    assert code == 2 and "is not a SQLite database" in text
    code, text = _error("--store", str(tmp_path), "--token", "")
    assert code == 2 and "Invalid value for --token: must not be empty" in text


def test_serves_a_finished_runs_store_read_only(tmp_path):
    source, writer = runs.make_source("sqlite", tmp_path)
    source.close()
    writer.close()
    before = writer.path.read_bytes()
    assert not (writer.root / "fedmla.sqlite-wal").exists()  # closed cleanly: everything is in the main file
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDMLA_DASHBOARD_TOKEN": "t0k"}
    proc = subprocess.Popen([sys.executable, "-m", "fedmla.worker.apps.cli", "dashboard", "--store", str(writer.root),
                             "--port", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert f"run {runs.RUN_ID!r}" in line and "?token=<token>" in line  # the token itself is not printed
        url = m.group(1)
        assert httpx.get(url + "api/summary").status_code == 401
        s = httpx.get(url + "api/summary", headers={"Authorization": "Bearer t0k"}).json()
        assert s["rounds_total"] == 3 and s["last_val_loss"] == 2.75
        r = httpx.get(url + "api/run", headers={"Authorization": "Bearer t0k"}).json()
        assert r["model"]["parameters"] == 97_728 and r["config"] == runs.CONFIG
        assert httpx.post(url + "api/summary", headers={"Authorization": "Bearer t0k"}).status_code == 405
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert writer.path.read_bytes() == before
