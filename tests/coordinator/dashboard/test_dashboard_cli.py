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
from coordinator.cli import app

ROOT = Path(__file__).resolve().parents[3]


def test_bad_store_paths_are_named(tmp_path):
    cli = CliRunner()
    r = cli.invoke(app, ["dashboard", "--store", str(tmp_path / "missing.sqlite")])
    assert r.exit_code == 2 and "store file not found" in r.output and "missing.sqlite" in r.output
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"\x00garbage" * 100)
    r = cli.invoke(app, ["dashboard", "--store", str(junk)])
    assert r.exit_code == 2 and "not a SQLite database" in r.output
    r = cli.invoke(app, ["dashboard", "--store", str(tmp_path / "x"), "--token", ""])
    assert r.exit_code == 2 and "--token" in r.output


def test_serves_a_finished_runs_store_read_only(tmp_path):
    source, writer = runs.make_source("sqlite", tmp_path)
    source.close()
    writer.close()
    before = writer.path.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDMLA_DASHBOARD_TOKEN": "t0k"}
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "dashboard", "--store", str(writer.path),
                             "--port", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert "run 'run-0001'" in line and "?token=<token>" in line  # the token itself is not printed
        url = m.group(1)
        assert httpx.get(url + "api/summary").status_code == 401
        s = httpx.get(url + "api/summary", headers={"Authorization": "Bearer t0k"}).json()
        assert s["rounds_total"] == 3 and s["last_val_loss"] == 2.75
        assert httpx.post(url + "api/summary", headers={"Authorization": "Bearer t0k"}).status_code == 405
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert writer.path.read_bytes() == before
