"""Virtual clients on one event loop (fedmla.worker.virtual) against a real coordinator."""

import json

from fedmla.coordinator.inprocess import BackgroundCoordinator
from fedmla.coordinator.testing import settings_for
from fedmla.protos.weights import model_hash
from fedmla.worker.data import load_stdlib_corpus
from fedmla.worker.runtime import Worker, WorkerOptions
from fedmla.worker.virtual import run_clients


def test_async_clients_on_one_loop_run_rounds_until_finished(tmp_path):
    data = load_stdlib_corpus(num_clients=3, max_bytes_per_client=20_000)
    settings = settings_for(tmp_path, round_timeout_s=180, client_timeout_s=180,  # slack for a loaded machine
                            rounds=2, clients_per_round=3, min_replies=3, local_steps=2, batch_size=2,
                            seq_len=32, max_update_bytes=64 << 20, init_seed=3, task_long_poll_s=2.0)
    with BackgroundCoordinator(settings) as bg:
        clients = [(f"v{i}", bg.call(lambda n=f"v{i}": bg.store.create_token(n)), c) for i, c in enumerate(data.clients)]
        out = run_clients(bg.target, clients, tmp_path / "clients")
        final = bg.call(lambda: bg.coord.model_sha)
        rows = bg.call(lambda: bg.store.client_rounds(2))
    assert [(name, code, err) for name, _, code, err in out] == [("v0", 0, ""), ("v1", 0, ""), ("v2", 0, "")]
    for name, w, _, _ in out:
        assert w.rounds_done == 2 and w.version == 2
        assert model_hash(w.global_state) == final            # every client ends on the committed model
        assert w.bytes_up > 0 and w.bytes_down > 0 and w.train_seconds > 0
        assert json.loads((tmp_path / "clients" / name / "worker.json").read_text())["last_round"] == 2
    assert sorted(r["status"] for r in rows) == ["replied"] * 3


class _Crash(Exception):
    pass


def test_async_worker_resends_what_a_blocking_worker_wrote_ahead(tmp_path, monkeypatch):
    """Both drivers share the write-ahead rule: a blocking worker dies after encoding, the
    same client restarted as an AsyncWorker sends the saved bytes without training."""
    data = load_stdlib_corpus(num_clients=1, max_bytes_per_client=20_000)
    settings = settings_for(tmp_path, round_timeout_s=180, client_timeout_s=180,  # slack for a loaded machine
                            rounds=1, clients_per_round=1, min_replies=1, local_steps=1,
                            batch_size=2, seq_len=32, max_update_bytes=64 << 20)
    with BackgroundCoordinator(settings) as bg:
        token = bg.call(lambda: bg.store.create_token("w0"))
        first = Worker(WorkerOptions(bg.target, token, tmp_path / "clients" / "w0", log=lambda m: None),
                       data.clients[0])

        def crash(self, *a, **kw):
            raise _Crash()
        monkeypatch.setattr(Worker, "_send", crash)
        try:
            first.run()
        except _Crash:
            pass
        pending = first._read_pending()
        assert pending is not None and pending["payload"]
        monkeypatch.undo()

        from fedmla.worker.trainer import LocalTrainer

        def no_training(*a, **kw):
            raise AssertionError("the restarted worker trained again")
        monkeypatch.setattr(LocalTrainer, "train", no_training)
        logs = []
        [(_, w, code, err)] = run_clients(bg.target, [("w0", token, data.clients[0])], tmp_path / "clients",
                                          log=logs.append)
        assert (code, err) == (0, "")
        assert any("re-sent the saved update" in m for m in logs), logs
        rows = bg.call(lambda: bg.store.client_rounds(1))
        assert [(r["client"], r["status"], r["bytes_up"]) for r in rows] == [("w0", "replied", len(pending["payload"]))]
        assert w.version == 1 and model_hash(w.global_state) == bg.call(lambda: bg.coord.model_sha)


def test_a_failing_client_is_reported_and_the_others_finish(tmp_path):
    data = load_stdlib_corpus(num_clients=2, max_bytes_per_client=20_000)
    settings = settings_for(tmp_path, round_timeout_s=180, client_timeout_s=180,  # slack for a loaded machine
                            rounds=1, clients_per_round=1, min_replies=1, local_steps=1, batch_size=2,
                            seq_len=32, max_update_bytes=64 << 20, min_clients=1)
    with BackgroundCoordinator(settings) as bg:
        good = bg.call(lambda: bg.store.create_token("good"))
        out = run_clients(bg.target, [("good", good, data.clients[0]), ("bad", "not-a-token", data.clients[1])],
                          tmp_path / "clients")
    (_, _, good_code, good_err), (_, _, bad_code, bad_err) = out
    assert (good_code, good_err) == (0, "")
    assert bad_code == 1 and "UNAUTHENTICATED" in bad_err


def test_heartbeats_only_when_the_client_was_otherwise_silent(tmp_path):
    """The async driver's heartbeat fills silences: none while other calls keep reaching
    the coordinator, one per interval once they stop."""
    import asyncio

    from fedmla.worker.virtual import AsyncWorker

    data = load_stdlib_corpus(num_clients=1, max_bytes_per_client=20_000)
    w = AsyncWorker(WorkerOptions("127.0.0.1:1", "t", tmp_path / "w"), data.clients[0])
    beats = []

    class FakeClient:
        async def heartbeat(self, **kw):
            beats.append(kw)

    async def scenario():
        import time
        w.client = FakeClient()
        hb = asyncio.get_running_loop().create_task(w._heartbeat_loop(1.0))
        for _ in range(50):             # busy: a call every 50 ms
            w._last_contact = time.monotonic()
            await asyncio.sleep(0.05)
        busy = len(beats)
        await asyncio.sleep(3.5)        # silent
        hb.cancel()
        return busy
    busy = _in_thread(scenario)
    assert busy == 0
    assert 1 <= len(beats) <= 4 and beats[0] == dict(round_id=0, state="idle")


def test_no_heartbeat_while_a_call_is_in_flight(tmp_path):
    """A held GetTask counts as contact: no heartbeat while it is in flight, the silence is
    counted from its answer, and a beat follows one interval of silence after it."""
    import asyncio

    from fedmla.worker.requests import Rpc
    from fedmla.worker.virtual import AsyncWorker

    data = load_stdlib_corpus(num_clients=1, max_bytes_per_client=20_000)
    w = AsyncWorker(WorkerOptions("127.0.0.1:1", "t", tmp_path / "w"), data.clients[0])
    beats, answered = [], []

    class FakeClient:
        async def heartbeat(self, **kw):
            beats.append(asyncio.get_running_loop().time())

        async def get_task(self):
            await asyncio.sleep(2.5)         # a long poll held 2.5 intervals
            answered.append(asyncio.get_running_loop().time())
            return "wait"

    async def scenario():
        w.client = FakeClient()
        hb = asyncio.get_running_loop().create_task(w._heartbeat_loop(1.0))
        reply = await w._perform(Rpc("get_task"))
        during = len(beats)
        await asyncio.sleep(1.6)        # silent after the answer
        hb.cancel()
        return reply, during
    reply, during = _in_thread(scenario)
    assert reply == "wait" and during == 0
    assert len(beats) == 1 and beats[0] >= answered[0] + 0.9     # one interval after the answer


def _in_thread(coro_fn):
    """asyncio.run in a thread of its own (the main thread keeps its event loop state)."""
    import asyncio
    import threading
    out = {}
    t = threading.Thread(target=lambda: out.__setitem__("v", asyncio.run(coro_fn())))
    t.start()
    t.join()
    return out["v"]


def test_a_trainer_is_used_only_by_the_thread_that_made_it(tmp_path, monkeypatch):
    """Virtual clients of one process share one trainer per compute thread (ComputeCache).
    An executor that alternates between two threads for every heavy step makes sure the
    trainer a client trains with was made in the thread that trains (two threads training
    one model instance crash), and the clients still end on the committed model."""
    import threading
    from concurrent.futures import Executor, ThreadPoolExecutor

    from fedmla.worker.cache import ComputeCache
    from fedmla.worker.trainer import LocalTrainer
    from fedmla.worker.virtual import AsyncWorker

    class Alternating(Executor):
        def __init__(self):
            self.pools = [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]
            self.calls = 0
            self.lock = threading.Lock()

        def submit(self, fn, *args, **kwargs):
            with self.lock:
                self.calls += 1
                pool = self.pools[self.calls % 2]
            return pool.submit(fn, *args, **kwargs)

        def shutdown(self, wait=True, **kw):
            for p in self.pools:
                p.shutdown(wait=wait)

    made_in, misuse = {}, []
    init, train = LocalTrainer.__init__, LocalTrainer.train

    def recording_init(self, *a, **kw):
        init(self, *a, **kw)
        made_in[id(self)] = threading.get_ident()

    def checked_train(self, *a, **kw):
        if made_in.get(id(self)) != threading.get_ident():
            misuse.append(id(self))
        return train(self, *a, **kw)
    monkeypatch.setattr(LocalTrainer, "__init__", recording_init)
    monkeypatch.setattr(LocalTrainer, "train", checked_train)

    data = load_stdlib_corpus(num_clients=2, max_bytes_per_client=20_000)
    settings = settings_for(tmp_path, round_timeout_s=180, client_timeout_s=180,  # slack for a loaded machine
                            rounds=2, clients_per_round=2, min_replies=2, local_steps=1, batch_size=2,
                            seq_len=32, max_update_bytes=64 << 20, task_long_poll_s=2.0)
    executor = Alternating()
    try:
        with BackgroundCoordinator(settings) as bg:
            tokens = [bg.call(lambda n=f"a{i}": bg.store.create_token(n)) for i in range(2)]
            cache = ComputeCache()

            async def both():
                import asyncio
                workers = [AsyncWorker(WorkerOptions(bg.target, tok, tmp_path / "clients" / f"a{i}", durable=False),
                                       c, executor, cache) for i, (tok, c) in enumerate(zip(tokens, data.clients))]
                codes = await asyncio.gather(*(w.run() for w in workers))
                return workers, codes
            workers, codes = _in_thread(both)
            final = bg.call(lambda: bg.coord.model_sha)
    finally:
        executor.shutdown()
    assert codes == [0, 0]
    assert made_in and not misuse
    assert all(w.rounds_done == 2 and model_hash(w.global_state) == final for w in workers)
