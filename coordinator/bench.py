"""`fedmla bench coordinator`: ingestion throughput, submit latency and peak RSS.

A coordinator runs as a subprocess (so its RSS is its own) on a fresh store with
``clients_per_round = min_replies = N``; N asyncio clients in this process, each on
its own channel, join, wait for their task and submit at once a realistic compressed
update: each round's updates are real
ClientCodec encodings for that round's plan (task mask and codec round), so the
coordinator validates, aggregates exactly and produces its downlink as in production.
Reported: updates/s from the first submit to the last reply,
p50/p99 submit latency, the CPU time per update over that span of the coordinator and of
the clients (they share the machine), the coordinator's peak RSS (VmHWM) after the last
round committed, and the round timings the store recorded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes(pid: int) -> int:
    return _status_bytes(pid, "VmHWM")


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far, in seconds."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def _codec_payloads(task, distinct: int) -> list[bytes]:
    """``distinct`` valid codec updates for ``task``'s plan (random pseudo-gradients)."""
    from .synthetic import synthetic_update
    return [synthetic_update(task, seed=1000 * task.round_id + i, num_examples=100 + i, scale=1e-2,
                             name=f"bench-{i}").SerializeToString() for i in range(distinct)]


async def _clients(target: str, tokens: list[str], rounds: int, distinct: int = 8, pid: int | None = None) -> dict:
    from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
    from fedmla.protos.transport import AsyncCoordinatorClient

    clients = [AsyncCoordinatorClient(target, t, timeout=600) for t in tokens]
    await asyncio.gather(*(c.join(num_examples=100 + i) for i, c in enumerate(clients)))
    latencies: list[float] = []
    per_round, to_commit, cpu = [], [], []
    sizes: list[int] = []
    for _ in range(rounds):
        async def ready(c):
            while True:
                r = await c.get_task()
                if r.status == cpb.GetTaskResponse.READY:
                    return r.task
                if r.status == cpb.GetTaskResponse.FINISHED:
                    raise RuntimeError("run finished early")
                await asyncio.sleep(0.05)
        tasks = await asyncio.gather(*(ready(c) for c in clients))
        # Encoding the payloads for this round's plan can outlast client_timeout_s on a
        # loaded machine: the clients heartbeat meanwhile so that they are not dropped.
        making = asyncio.ensure_future(asyncio.to_thread(_codec_payloads, tasks[0], distinct))
        while not making.done():
            await asyncio.wait([making], timeout=5.0)
            if not making.done():
                await asyncio.gather(*(c.heartbeat(t.round_id) for c, t in zip(clients, tasks)))
        payloads = making.result()
        sizes.extend(len(p) for p in payloads)
        start_all = time.perf_counter()
        cpu0, own0 = _cpu_seconds(pid), time.process_time()

        async def submit(i, c, task):
            t0 = time.perf_counter()
            await c.submit(payloads[i % len(payloads)], task.round_id, task.model.version)
            latencies.append(time.perf_counter() - t0)
        await asyncio.gather(*(submit(i, c, t) for i, (c, t) in enumerate(zip(clients, tasks))))
        last_submit = time.perf_counter()
        cpu.append((_cpu_seconds(pid) - cpu0, time.process_time() - own0))
        per_round.append(last_submit - start_all)
        # wait for the commit before the next round (or the end)
        while True:
            r = await clients[0].get_task()
            if r.model.version > tasks[0].model.version:
                break
            await asyncio.sleep(0.02)
        to_commit.append(time.perf_counter() - last_submit)
    await asyncio.gather(*(c.close() for c in clients))
    return {"latencies": latencies, "ingest_seconds": per_round, "sizes": sizes, "to_commit": to_commit, "cpu": cpu}


def run_bench(clients: int, preset: str = "small", rounds: int = 1, codec: str = "default",
              distinct_updates: int = 8) -> dict:
    from .store import Store
    from .testing import start_coordinator_process

    mode_args = ["--codec", codec]
    with tempfile.TemporaryDirectory(prefix="fedmla-bench-") as tmp:
        store_dir = Path(tmp) / "store"
        st = Store(store_dir)
        tokens = [st.create_token(f"client-{i:05d}") for i in range(clients)]
        st.close()
        log_path = Path(tmp) / "coordinator.log"
        proc, port = start_coordinator_process(store_dir, [
            "--preset", preset, "--clients-per-round", str(clients), "--min-replies", str(clients),
            "--rounds", str(rounds), "--round-timeout-s", "3600", *mode_args, "--log-level", "warning"], log_path)
        try:
            rss_idle = _status_bytes(proc.pid, "VmRSS")
            t0 = time.perf_counter()
            res = asyncio.run(_clients(f"127.0.0.1:{port}", tokens, rounds, distinct_updates, proc.pid))
            wall = time.perf_counter() - t0
            peak = _peak_rss_bytes(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        st = Store(store_dir, create=False)
        rounds_rows = st.rounds()
        st.close()
    lat = res["latencies"]
    ingest = sum(res["ingest_seconds"])
    return {
        "clients": clients, "preset": preset, "rounds": rounds, "codec": codec,
        "update_bytes_mean": int(statistics.mean(res["sizes"])),
        "updates": len(lat),
        "updates_per_s": len(lat) / ingest if ingest else None,
        "submit_latency_s": {"p50": _percentile(lat, 0.5), "p99": _percentile(lat, 0.99), "max": max(lat)},
        # the coordinator's CPU time (all threads) from the first submit to the last reply
        "coordinator_cpu_ms_per_update": 1e3 * sum(c for c, _ in res["cpu"]) / len(lat) if lat else None,
        # and the bench clients' (this process, on the same cores)
        "clients_cpu_ms_per_update": 1e3 * sum(c for _, c in res["cpu"]) / len(lat) if lat else None,
        "coordinator_peak_rss_bytes": peak,
        "coordinator_rss_after_start_bytes": rss_idle,
        "aggregation_s": [r["aggregation_s"] for r in rounds_rows],
        # seen by a client: from the last reply to a submit until GetTask shows the new version
        "last_submit_to_commit_s": res["to_commit"],
        "round_status": [r["status"] for r in rounds_rows],
        "wall_s": wall,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
