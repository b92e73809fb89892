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
        workers, _ = _run_workers(bg, data, tmp_path)    # asserts every worker exits 0
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


def _run_workers(bg, data, tmp_path, prefix="w"):
    from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
    workers, kinds, results = [], {}, {}
    for i, c in enumerate(data.clients):
        token = bg.call(lambda n=f"{prefix}{i}": bg.store.create_token(n))
        w = Worker(WorkerOptions(bg.target, token, tmp_path / f"{prefix}{i}", log=lambda m: None), c)
        kinds[i] = []

        def download(since, w=w, i=i, orig=w._download):
            dl = orig(since)
            kinds[i].append((since, cpb.DownloadModelResponse.Kind.Name(dl.kind)))
            return dl
        w._download = download
        workers.append(w)
    threads = [threading.Thread(target=lambda w=w, i=i: results.__setitem__(i, w.run())) for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert results == {i: 0 for i in range(len(workers))}
    return workers, kinds


def test_seeded_run_workers_rebuild_version_zero_and_download_only_downlinks(tmp_path):
    """In a preset run a worker that holds nothing rebuilds version 0 from the seed the
    coordinator announces and downloads only codec downlinks, never the full state."""
    from fedmla.protos.weights import model_hash
    data = load_stdlib_corpus(num_clients=2, max_bytes_per_client=20_000)
    settings = settings_for(tmp_path, rounds=2, clients_per_round=2, min_replies=2, local_steps=2, batch_size=2,
                            seq_len=32, max_update_bytes=64 << 20, init_seed=7)
    with BackgroundCoordinator(settings) as bg:
        workers, kinds = _run_workers(bg, data, tmp_path)
        final = bg.call(lambda: bg.coord.model_sha)
        full = bg.call(lambda: len(bg.coord.downloads._full_state(bg.coord.version, bg.coord.state,
                                                                   bg.coord.shared)[0]))
    for i, w in enumerate(workers):
        # round 1 trains from version 0 with no download; later syncs are chains from a held version
        assert kinds[i] and all(k == "CODEC_CHAIN" for _, k in kinds[i]), kinds[i]
        assert kinds[i][0][0] == 0
        assert model_hash(w.global_state) == final
        assert 0 < w.bytes_down < full / 4


def test_worker_whose_seeded_rebuild_differs_downloads_the_full_state(tmp_path, monkeypatch):
    """A rebuild that does not hash to version 0 (another torch, another seed) is never
    used: the worker downloads the full state and ends on the coordinator's model."""
    import fedmla.mla_model as mm
    from fedmla.protos.weights import model_hash
    real = mm.init_global_state
    monkeypatch.setattr(mm, "init_global_state", lambda cfg, seed: real(cfg, seed + 1))
    data = load_stdlib_corpus(num_clients=1, max_bytes_per_client=20_000)
    settings = settings_for(tmp_path, rounds=1, clients_per_round=1, min_replies=1, local_steps=1, batch_size=2,
                            seq_len=32, max_update_bytes=64 << 20)
    with BackgroundCoordinator(settings) as bg:
        workers, kinds = _run_workers(bg, data, tmp_path)
        final = bg.call(lambda: bg.coord.model_sha)
    assert kinds[0][0] == (None, "CODEC_FULL")
    assert model_hash(workers[0].global_state) == final


def test_pending_record_of_a_worker_that_is_not_durable_stays_in_memory(tmp_path):
    """durable=False (simulate's virtual clients): the write-ahead record is kept by the
    worker, not written; it reads back what was written, and later changes to the residual
    tensors it was given do not reach it."""
    import torch

    from fedmla.worker.runtime import WorkerProtocol
    data = load_stdlib_corpus(num_clients=1, max_bytes_per_client=5_000).clients[0]
    residual = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    workers = {}
    for durable in (False, True):
        w = workers[durable] = WorkerProtocol(WorkerOptions("127.0.0.1:1", "t", tmp_path / f"d{durable}", durable=durable), data)
        assert w._read_pending() is None
        w._write_pending(3, 2, b"update-bytes", "{}", residual)
        on_disk = (tmp_path / f"d{durable}" / "pending.safetensors").exists()
        assert on_disk == durable
        got = w._read_pending()
        assert (got["round_id"], got["version"], got["payload"], got["config"]) == (3, 2, b"update-bytes", "{}")
        assert torch.equal(got["residual"]["w"], residual["w"])
    residual["w"] += 1
    assert torch.equal(workers[False]._read_pending()["residual"]["w"], residual["w"] - 1)
