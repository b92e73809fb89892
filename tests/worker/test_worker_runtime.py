"""The gRPC worker against a real in-process coordinator over loopback."""

import json
import threading

from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.inprocess import BackgroundCoordinator
from coordinator.testing import settings_for
from worker.data import load_stdlib_corpus
from worker.runtime import Worker, WorkerOptions


def test_workers_run_rounds_until_finished(tmp_path):
    data = load_stdlib_corpus(num_clients=2, max_bytes_per_client=20_000)
    settings = settings_for(tmp_path, rounds=2, clients_per_round=2, min_replies=2, local_steps=2, batch_size=2,
                            seq_len=32, max_update_bytes=64 << 20)
    with BackgroundCoordinator(settings) as bg:
        results, workers = {}, []
        for i, c in enumerate(data.clients):
            token = bg.call(lambda n=f"w{i}": bg.store.create_token(n))
            w = Worker(WorkerOptions(bg.target, token, tmp_path / f"w{i}", log=lambda m: None), c)
            workers.append(w)
        threads = [threading.Thread(target=lambda w=w, i=i: results.__setitem__(i, w.run())) for i, w in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert results == {0: 0, 1: 0}
        assert all(w.rounds_done == 2 for w in workers)
        meta = json.loads((tmp_path / "w0" / "worker.json").read_text())
        assert meta["last_round"] >= 2


def test_bad_data_clear_message(tmp_path):
    r = CliRunner().invoke(app, ["worker", "--coordinator", "127.0.0.1:1", "--name", "alice", "--token", "x",
                                 "--state-dir", str(tmp_path / "s"), "--data", str(tmp_path / "missing")])
    assert r.exit_code == 2
    assert "alice" in r.output and "missing" in r.output
    assert "Traceback" not in r.output
