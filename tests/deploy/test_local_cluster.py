"""deploy/local/up.sh: a 3-node Ray cluster, a TLS coordinator with tokens and a 2-round
job of Ray-actor clients on loopback; then down.sh stops exactly what up.sh started."""

import json
import os
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UP, DOWN = ROOT / "deploy" / "local" / "up.sh", ROOT / "deploy" / "local" / "down.sh"


def session_members(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().split())


@pytest.fixture
def cluster_dir(tmp_path):
    d = tmp_path / "cluster"
    yield d
    # Whatever happened, leave nothing running.
    subprocess.run(["bash", str(DOWN), "--dir", str(d)], capture_output=True, text=True, timeout=180)


def test_up_runs_a_two_round_tls_job_and_down_stops_everything(cluster_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    up = subprocess.run(["bash", str(UP), "--dir", str(cluster_dir), "--clients", "3", "--rounds", "2"],
                        capture_output=True, text=True, timeout=300, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "dashboard     http://127.0.0.1:" in up.stdout
    recorded = dict(reversed(line.split()) for line in (cluster_dir / "pids").read_text().splitlines())
    assert {"ray-head", "ray-node-1", "ray-node-2", "coordinator", "job"} <= set(recorded)
    ports = read_env(cluster_dir / "ports.env")

    # The dashboard answers while the job runs.
    with urllib.request.urlopen(ports["FEDMLA_DASHBOARD"] + "/api/summary", timeout=10) as r:
        assert r.status == 200
        assert "current_round" in json.loads(r.read())

    # The job finishes: its JSON result appears, and the store holds 2 committed rounds.
    job_json = cluster_dir / "job.json"
    deadline = time.monotonic() + 420
    while not job_json.exists() and time.monotonic() < deadline:
        assert session_members(int(recorded["job"])) or job_json.exists(), \
            "the job exited without a result:\n" + (cluster_dir / "logs" / "job.log").read_text()[-3000:]
        time.sleep(2)
    assert job_json.exists(), (cluster_dir / "logs" / "job.log").read_text()[-3000:]
    db = sqlite3.connect(f"file:{cluster_dir / 'store' / 'fedmla.sqlite'}?mode=ro", uri=True)
    committed = db.execute("SELECT COUNT(*) FROM rounds WHERE status = 'committed'").fetchone()[0]
    db.close()
    assert committed == 2
    with urllib.request.urlopen(ports["FEDMLA_DASHBOARD"] + "/api/summary", timeout=10) as r:
        assert json.loads(r.read())["current_round"] >= 2

    down = subprocess.run(["bash", str(DOWN), "--dir", str(cluster_dir)], capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    for name, sid in recorded.items():
        assert session_members(int(sid)) == [], f"{name} (session {sid}) left processes behind"
