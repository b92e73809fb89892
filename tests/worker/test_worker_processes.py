"""`fedmla worker` processes against a coordinator process: a SIGKILLed worker is a dropout."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from fedmla.coordinator.store import Store
from fedmla.coordinator.testing import start_coordinator_process, wait_for

ROOT = Path(__file__).resolve().parents[2]


def start_worker(tmp_path, port, name, token, index):
    (tmp_path / f"{name}.token").write_text(token)
    log = tmp_path / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "fedmla.worker.apps.cli", "worker", "--coordinator", f"127.0.0.1:{port}",
                             "--name", name, "--token-file", str(tmp_path / f"{name}.token"),
                             "--state-dir", str(tmp_path / name), "--data", "builtin", "--client-index", str(index)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return proc, log


def test_sigkilled_worker_is_a_dropout(tmp_path):
    store_dir = tmp_path / "store"
    st = Store(store_dir)
    tokens = {n: st.create_token(n) for n in ("a", "b", "victim")}
    st.close()
    coord, port = start_coordinator_process(store_dir, [
        "--rounds", "1", "--clients-per-round", "3", "--min-replies", "2", "--round-timeout-s", "60",
        "--client-timeout-s", "10", "--heartbeat-interval-s", "1", "--local-steps", "15", "--batch-size", "4",
        "--seq-len", "32"], tmp_path / "coord.log")
    procs = {}
    try:
        for i, n in enumerate(("a", "b", "victim")):
            procs[n] = start_worker(tmp_path, port, n, tokens[n], i)
        victim, vlog = procs["victim"]
        wait_for(lambda: "training" in vlog.read_text(), timeout=120, every=0.05, what="the victim to start training")
        os.kill(victim.pid, signal.SIGKILL)
        for n in ("a", "b"):
            assert procs[n][0].wait(timeout=180) == 0, procs[n][1].read_text()
        st = Store(store_dir, create=False)
        rounds = st.rounds()
        assert [r["status"] for r in rounds] == ["committed"], [(r["status"], r["reason"]) for r in rounds]
        statuses = {r["client"]: r["status"] for r in st.client_rounds(rounds[0]["id"])}
        st.close()
        assert statuses == {"a": "replied", "b": "replied", "victim": "dropped"}
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        coord.terminate()
        coord.wait(30)


def test_worker_carries_on_after_coordinator_restart(tmp_path):
    store_dir = tmp_path / "store"
    st = Store(store_dir)
    token = st.create_token("w")
    st.close()
    args = ["--rounds", "3", "--clients-per-round", "1", "--min-replies", "1", "--round-timeout-s", "60",
            "--heartbeat-interval-s", "1", "--local-steps", "3", "--batch-size", "2", "--seq-len", "32"]
    coord, port = start_coordinator_process(store_dir, args, tmp_path / "coord.log")
    worker, wlog = start_worker(tmp_path, port, "w", token, 0)
    try:
        wait_for(lambda: "round 1: submitted" in wlog.read_text(), timeout=120, every=0.05, what="round 1")
        coord.send_signal(signal.SIGKILL)
        coord.wait(30)
        coord, _ = start_coordinator_process(store_dir, [*args, "--port", str(port)], tmp_path / "coord.log")
        assert worker.wait(timeout=180) == 0, wlog.read_text()
        st = Store(store_dir, create=False)
        committed = [r["id"] for r in st.rounds() if r["status"] == "committed"]
        st.close()
        assert len(committed) == 3
        text = wlog.read_text()
        assert "run finished" in text
        for r in committed:   # each committed round was submitted exactly once by the worker
            assert text.count(f"round {r}: submitted") + text.count(f"round {r}: already accepted") <= 1
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        coord.terminate()
        coord.wait(30)
