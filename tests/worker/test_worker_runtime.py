"""The gRPC worker against a real in-process coordinator over loopback."""

import json
import threading

from typer.testing import CliRunner

from fedmla.worker.apps.cli import app
from fedmla.coordinator.inprocess import BackgroundCoordinator
from fedmla.coordinator.testing import settings_for
from fedmla.worker.data import load_stdlib_corpus
from fedmla.worker.runtime import Worker, WorkerOptions


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


class _Crash(Exception):
    pass


def test_restarted_worker_resends_the_update_it_wrote_ahead(tmp_path, monkeypatch):
    """A worker that dies after encoding (pending.safetensors written) but before sending
    sends the very same bytes after restart, without training again."""
    data = load_stdlib_corpus(num_clients=1, max_bytes_per_client=20_000)
    settings = settings_for(tmp_path, rounds=1, clients_per_round=1, min_replies=1, local_steps=1,
                            batch_size=2, seq_len=32, max_update_bytes=64 << 20)
    with BackgroundCoordinator(settings) as bg:
        token = bg.call(lambda: bg.store.create_token("w0"))
        logs = []
        first = Worker(WorkerOptions(bg.target, token, tmp_path / "w0", log=logs.append), data.clients[0])

        def crash(self, *a, **kw):
            raise _Crash()
        monkeypatch.setattr(Worker, "_send", crash)
        try:
            first.run()
        except _Crash:
            pass
        pending = first._read_pending()
        assert pending is not None and pending["round_id"] == 1 and pending["payload"]
        assert pending["residual"], "the codec residual is saved with the update"
        monkeypatch.undo()

        from fedmla.worker.trainer import LocalTrainer

        def no_training(*a, **kw):
            raise AssertionError("the restarted worker trained again")
        monkeypatch.setattr(LocalTrainer, "train", no_training)
        second = Worker(WorkerOptions(bg.target, token, tmp_path / "w0", log=logs.append), data.clients[0])
        assert second.run() == 0
        assert any("re-sent the saved update" in m for m in logs), logs
        rows = bg.call(lambda: bg.store.client_rounds(1))
        assert [(r["client"], r["status"], r["bytes_up"]) for r in rows] == [("w0", "replied", len(pending["payload"]))]
        # The coordinator committed from those bytes, and the worker ends on its model.
        assert second.version == 1
        from fedmla.protos.weights import model_hash
        assert model_hash(second.global_state) == bg.call(lambda: bg.coord.model_sha)
