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

from fedmla.coordinator.inprocess import BackgroundCoordinator
from fedmla.coordinator.store import Store
from fedmla.coordinator.synthetic import SyntheticCodecClient, synthetic_update
from fedmla.coordinator.testing import settings_for, start_coordinator_process
from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.transport import CoordinatorClient

ROUNDS = 24
CODEC_ROUNDS = 12
NAMES = ["a", "b"]
ARGS = ["--preset", "tiny", "--clients-per-round", "2", "--min-replies", "2", "--round-timeout-s", "120",
        "--log-level", "warning"]


def update(task, name):
    """A client that never downloads: a seeded codec encoding for the task's plan."""
    return synthetic_update(task, seed=task.round_id * 100 + NAMES.index(name), num_examples=10 + NAMES.index(name))


def connect(port, tokens):
    out = {n: CoordinatorClient(f"127.0.0.1:{port}", tokens[n], timeout=30) for n in NAMES}
    for c in out.values():
        c.join(num_examples=10)
    return out


def drive(clients, codec: dict[str, SyntheticCodecClient] | None = None):
    """Submit deterministic updates until the last version is committed; return the final download.

    ``codec``: one SyntheticCodecClient per name (kept across coordinator restarts, like a
    worker process that outlives the coordinator); their updates are codec encodings."""
    submitted = set()
    rounds = CODEC_ROUNDS if codec else ROUNDS
    while True:
        for name, c in clients.items():
            r = c.get_task()
            if r.model.version >= rounds:
                return c.download()
            if r.status == cpb.GetTaskResponse.READY and (name, r.task.round_id) not in submitted:
                try:
                    if codec:
                        codec[name].client = c
                        payload = codec[name].update_for(r.task)
                    else:
                        payload = update(r.task, name)
                    c.submit(payload, r.task.round_id, r.task.model.version)
                except grpc.RpcError as e:
                    if e.code() not in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION):
                        raise
                submitted.add((name, r.task.round_id))


def reference(tmp_path, mode="stateless"):
    with BackgroundCoordinator(settings_for(tmp_path / "ref", preset="tiny", clients_per_round=2, min_replies=2)) as bg:
        tokens = {n: bg.call(lambda n=n: bg.store.create_token(n)) for n in NAMES}
        clients = connect(bg.port, tokens)
        final = drive(clients, {n: SyntheticCodecClient(None, n) for n in NAMES} if mode == "codec" else None)
        for c in clients.values():
            c.close()
    return final


def crashed_run(tmp_path, offsets, mode="stateless"):
    codec = {n: SyntheticCodecClient(None, n) for n in NAMES} if mode == "codec" else None
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
                final = drive(clients, codec)
                if off is None:
                    return final, killed, codec
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


def _check(tmp_path, n_offsets, seed, mode="stateless", span=0.3):
    rng = random.Random(seed)
    ref = reference(tmp_path, mode)
    results = []
    per_run = 4
    for i in range(0, n_offsets, per_run):
        offs = [rng.uniform(0.01, span) for _ in range(min(per_run, n_offsets - i))]
        final, killed, codec = crashed_run(tmp_path / f"run{i}", offs, mode)
        results.append((offs, killed, final.model.sha256 == ref.model.sha256))
        assert final.model.version == (ROUNDS if mode == "stateless" else CODEC_ROUNDS)
        assert final.model.sha256 == ref.model.sha256 and final.data == ref.data
        if codec:   # the clients followed along with codec downloads that reproduced every version's hash
            kinds = [k for c in codec.values() for k in c.downloads]
            assert cpb.DownloadModelResponse.CODEC_CHAIN in kinds, kinds
    print(f"{mode}: crash offsets (s), kills landed, hash matched:", results)
    assert sum(k for _, k, _ in results) >= max(1, n_offsets // 2)   # the kills did land mid-run


def test_coordinator_crash_offsets_fast(tmp_path):
    _check(tmp_path, 3, seed=9)


def test_codec_coordinator_crash_offsets_fast(tmp_path):
    """The codec's state (momentum, residual, importance, bases) and downlinks survive
    SIGKILL at random points: the final model is bit-identical to an uninterrupted run."""
    _check(tmp_path, 3, seed=11, mode="codec", span=1.0)


@pytest.mark.slow
def test_coordinator_crash_offsets_full(tmp_path):
    _check(tmp_path, 20, seed=2026)


@pytest.mark.slow
def test_codec_coordinator_crash_offsets_full(tmp_path):
    _check(tmp_path, 20, seed=2027, mode="codec", span=1.5)
