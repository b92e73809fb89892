"""Coordinator crash at seeded random offsets (issue 9 item 2): SIGKILL the coordinator
process while rounds run (mid-upload, mid-aggregation, mid-commit/downlink), restart it
on the same store, finish the run; the final model's SHA-256 equals an uninterrupted
run's with the same deterministic client updates. CI: 3 offsets; --run-slow: 20."""

import os
import random
import signal
import threading

import grpc
import pytest

from coordinator.inprocess import BackgroundCoordinator
from coordinator.store import Store
from coordinator.synthetic import synthetic_update
from coordinator.testing import settings_for, start_coordinator_process
from coordinator.validation import ModelSpec
from mla_model import MLAConfig
from protos.fedmla.v1 import coordinator_pb2 as cpb
from worker.transport import CoordinatorClient

ROUNDS = 24
NAMES = ["a", "b"]
SPEC = ModelSpec.from_config(MLAConfig.preset("tiny"))
ARGS = ["--preset", "tiny", "--clients-per-round", "2", "--min-replies", "2", "--round-timeout-s", "120",
        "--log-level", "warning"]


def update(round_id, name):
    return synthetic_update(SPEC, rank=4, seed=round_id * 100 + NAMES.index(name), num_examples=10 + NAMES.index(name))


def connect(port, tokens):
    out = {n: CoordinatorClient(f"127.0.0.1:{port}", tokens[n], timeout=30) for n in NAMES}
    for c in out.values():
        c.join(num_examples=10)
    return out


def drive(clients):
    """Submit deterministic updates until version ROUNDS is committed; return the final download."""
    submitted = set()
    while True:
        for name, c in clients.items():
            r = c.get_task()
            if r.model.version >= ROUNDS:
                return c.download()
            if r.status == cpb.GetTaskResponse.READY and (name, r.task.round_id) not in submitted:
                try:
                    c.submit(update(r.task.round_id, name), r.task.round_id, r.task.model.version)
                except grpc.RpcError as e:
                    if e.code() not in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION):
                        raise
                submitted.add((name, r.task.round_id))


def reference(tmp_path):
    with BackgroundCoordinator(settings_for(tmp_path / "ref", preset="tiny", clients_per_round=2, min_replies=2)) as bg:
        tokens = {n: bg.call(lambda n=n: bg.store.create_token(n)) for n in NAMES}
        clients = connect(bg.port, tokens)
        final = drive(clients)
        for c in clients.values():
            c.close()
    return final


def crashed_run(tmp_path, offsets):
    store_dir = tmp_path / "store"
    st = Store(store_dir)
    tokens = {n: st.create_token(n) for n in NAMES}
    st.close()
    log = tmp_path / "coordinator.log"
    killed = 0
    for off in [*offsets, None]:
        proc, port = start_coordinator_process(store_dir, ARGS, log)
        try:
            clients = connect(port, tokens)
            killer = None
            if off is not None:
                killer = threading.Timer(off, lambda: os.kill(proc.pid, signal.SIGKILL))
                killer.start()
            try:
                final = drive(clients)
                if off is None:
                    return final, killed
                killer.cancel()          # run finished before this offset: the kill did not land
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN), e
                killed += 1
            if killer:
                killer.join()
            for c in clients.values():
                c.close()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    raise AssertionError("unreachable")


def _check(tmp_path, n_offsets, seed):
    rng = random.Random(seed)
    ref = reference(tmp_path)
    results = []
    per_run = 4
    for i in range(0, n_offsets, per_run):
        offs = [rng.uniform(0.01, 0.3) for _ in range(min(per_run, n_offsets - i))]
        final, killed = crashed_run(tmp_path / f"run{i}", offs)
        results.append((offs, killed, final.model.sha256 == ref.model.sha256))
        assert final.model.version == ROUNDS and final.model.sha256 == ref.model.sha256 and final.data == ref.data
    print("crash offsets (s), kills landed, hash matched:", results)
    assert sum(k for _, k, _ in results) >= max(1, n_offsets // 2)   # the kills did land mid-run


def test_coordinator_crash_offsets_fast(tmp_path):
    _check(tmp_path, 3, seed=9)


@pytest.mark.slow
def test_coordinator_crash_offsets_full(tmp_path):
    _check(tmp_path, 20, seed=2026)
