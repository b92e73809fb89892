"""SIGKILL the coordinator process during round k+1; the restarted one resumes at k+1
from a bit-identical round-k model, and finishes the run exactly like an uninterrupted one."""

import os
import signal

from fedmla.coordinator.inprocess import BackgroundCoordinator
from fedmla.coordinator.store import Store
from fedmla.coordinator.synthetic import synthetic_update
from fedmla.coordinator.testing import ready_task, settings_for, start_coordinator_process, wait_for
from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.transport import CoordinatorClient

K = 2
NAMES = ["a", "b"]
ARGS = ["--preset", "tiny", "--clients-per-round", "2", "--min-replies", "2", "--round-timeout-s", "120",
        "--log-level", "warning"]


def update(task, name):
    return synthetic_update(task, seed=task.round_id * 100 + NAMES.index(name), num_examples=10 + NAMES.index(name))


def play_round(clients, expect_round, only=None):
    for name, c in clients.items():
        if only is not None and name not in only:
            continue
        t = ready_task(c)
        assert t.round_id == expect_round
        c.submit(update(t, name), t.round_id, t.model.version)


def connect(port, tokens):
    out = {n: CoordinatorClient(f"127.0.0.1:{port}", tokens[n], timeout=30) for n in NAMES}
    for c in out.values():
        c.join(num_examples=10)
    return out


def test_sigkill_during_round_resumes_from_committed_model(tmp_path):
    store_dir = tmp_path / "store"
    st = Store(store_dir)
    tokens = {n: st.create_token(n) for n in NAMES}
    st.close()
    log = tmp_path / "coordinator.log"
    proc, port = start_coordinator_process(store_dir, ARGS, log)
    try:
        clients = connect(port, tokens)
        for r in range(1, K + 1):
            play_round(clients, r)
            wait_for(lambda: clients["a"].get_task().model.version == r, what=f"round {r} commit")
        committed = clients["a"].download()
        assert committed.model.version == K
        play_round(clients, K + 1, only=["a"])       # round k+1 is open with one reply
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for c in clients.values():
            c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    on_disk = (store_dir / "checkpoints" / f"model-v{K:06d}.safetensors").read_bytes()
    assert __import__("hashlib").sha256(on_disk).hexdigest() == committed.model.sha256

    proc, port = start_coordinator_process(store_dir, ARGS, log)
    try:
        clients = connect(port, tokens)
        t = ready_task(clients["a"])
        assert (t.round_id, t.model.version, t.model.sha256) == (K + 1, K, committed.model.sha256)
        again = clients["b"].download()
        assert again.data == committed.data             # bit-identical round-k model
        play_round(clients, K + 1)
        wait_for(lambda: clients["a"].get_task().model.version == K + 1, what="round k+1 commit")
        resumed = clients["a"].download()
        for c in clients.values():
            c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0                       # graceful shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    st = Store(store_dir, create=False)
    assert [(r["id"], r["status"]) for r in st.rounds()] == [(i, "committed") for i in range(1, K + 2)]
    st.close()

    # the same rounds without the crash give the same bytes
    with BackgroundCoordinator(settings_for(tmp_path / "ref", preset="tiny", clients_per_round=2, min_replies=2)) as bg:
        ref_tokens = {n: bg.call(lambda n=n: bg.store.create_token(n)) for n in NAMES}
        clients = connect(bg.port, ref_tokens)
        for r in range(1, K + 2):
            play_round(clients, r)
            wait_for(lambda: clients["a"].get_task().model.version == r, what=f"reference round {r}")
        assert clients["a"].get_task().status != cpb.GetTaskResponse.FINISHED
        ref = clients["a"].download()
        for c in clients.values():
            c.close()
    assert ref.model.sha256 == resumed.model.sha256 and ref.data == resumed.data


def test_killed_at_random_moments_always_restarts_from_a_committed_round(tmp_path):
    """SIGKILL at seeded random moments while rounds run (mid-upload, mid-aggregation,
    mid-commit, idle): every restart opens the store, serves the last committed model
    (its bytes hash to what the database recorded) and never goes back in versions."""
    import hashlib
    import random
    import sqlite3
    import threading

    import grpc

    rng = random.Random(1234)
    store_dir = tmp_path / "store"
    st = Store(store_dir)
    tokens = {n: st.create_token(n) for n in NAMES}
    st.close()
    log = tmp_path / "coordinator.log"
    seen_version = 0
    for attempt in range(4):
        proc, port = start_coordinator_process(store_dir, ARGS, log)
        try:
            clients = connect(port, tokens)
            first = clients["a"].download()
            assert first.model.version >= seen_version
            db = sqlite3.connect(store_dir / "fedmla.sqlite")
            version, path, sha = db.execute("SELECT version, path, sha256 FROM models ORDER BY version DESC LIMIT 1").fetchone()
            committed = db.execute("SELECT COUNT(*) FROM rounds WHERE status='committed'").fetchone()[0]
            db.close()
            assert version == committed == first.model.version and sha == first.model.sha256
            assert hashlib.sha256((store_dir / path).read_bytes()).hexdigest() == sha == first.model.sha256
            seen_version = first.model.version
            killer = threading.Timer(rng.uniform(0.2, 2.5), lambda: os.kill(proc.pid, signal.SIGKILL))
            killer.start()
            try:
                while True:
                    for name, c in clients.items():
                        r = c.get_task()
                        if r.status == cpb.GetTaskResponse.READY:
                            c.submit(update(r.task, name), r.task.round_id, r.task.model.version)
                        seen_version = max(seen_version, r.model.version)
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN), e
            killer.join()
            proc.wait(10)
            for c in clients.values():
                c.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert seen_version >= 1   # rounds did commit between the kills
