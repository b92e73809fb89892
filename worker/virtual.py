"""Many virtual clients on one asyncio event loop (``fedmla simulate``'s client actors).

Every virtual client is an :class:`AsyncWorker`: the same protocol as ``fedmla worker``
(:class:`~fedmla.worker.runtime.WorkerProtocol`: syncing, the write-ahead pending file,
encoding, the resend and refusal rules, byte counters), driven by coroutines instead of
blocking calls. Its RPCs go over its own grpc.aio channel, its heartbeat is a task of the
loop (sent only when the client has been silent for a heartbeat interval: its other
calls already tell the coordinator it is alive), and its CPU-heavy steps (training,
decoding and hashing downloads, encoding, the fsync of its state) run on a small thread
pool shared by all clients of the loop, so a thousand idle clients cost a thousand parked
coroutines rather than two thousand threads. The clients of a loop also share a
:class:`~fedmla.worker.cache.ComputeCache`: the seeded version 0, the result of each
download they apply (keyed by its bytes and the version it starts from) and one local
trainer per thread are computed once, not once per client.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor

import grpc

from fedmla.protos.transport import AsyncCoordinatorClient

from .cache import ComputeCache
from .data import ClientData
from .requests import Compute, Download, Rpc, Sleep, StartHeartbeat
from .runtime import WorkerOptions, WorkerProtocol


class AsyncWorker(WorkerProtocol):
    """The asyncio driver: ``await worker.run()`` on a running loop."""

    def __init__(self, opts: WorkerOptions, data: ClientData, executor: Executor | None = None,
                 cache: ComputeCache | None = None):
        super().__init__(opts, data, cache)
        self.executor = executor
        self.client: AsyncCoordinatorClient | None = None     # made on the loop, in run()
        self._hb: asyncio.Task | None = None
        self._last_contact = time.monotonic()                  # start or end of this client's latest call
        self._calls = 0                                        # calls to the coordinator in flight
        self.compute_seconds: dict[str, float] = {}            # CPU seconds of each heavy step, by name

    async def _drive(self, steps):
        """Run a protocol generator to its end, awaiting what it yields."""
        try:
            request = next(steps)
            while True:
                try:
                    result = await self._perform(request)
                except Exception as e:
                    request = steps.throw(e)
                else:
                    request = steps.send(result)
        except StopIteration as stop:
            return stop.value

    async def _perform(self, request):
        if isinstance(request, (Rpc, Download)):
            # the coordinator hears from this client when a call starts and again when it
            # answers it (a held GetTask refreshes the client's last-seen time at its end)
            self._last_contact = time.monotonic()
            self._calls += 1
            try:
                if isinstance(request, Rpc):
                    return await getattr(self.client, request.name)(*request.args, **(request.kwargs or {}))
                return await self._drive(self._call("download", request.since))
            finally:
                self._calls -= 1
                self._last_contact = time.monotonic()
        if isinstance(request, Compute):
            if self.executor is None:
                return self._timed(request.fn, *request.args)
            return await asyncio.get_running_loop().run_in_executor(self.executor, self._timed, request.fn,
                                                                    *request.args)
        if isinstance(request, Sleep):
            await asyncio.sleep(request.seconds)
            return None
        if isinstance(request, StartHeartbeat):
            self._hb = asyncio.get_running_loop().create_task(self._heartbeat_loop(request.interval))
            return None
        raise TypeError(f"unknown request {request!r}")

    def _timed(self, fn, *args):
        """``fn(*args)``, its thread's CPU time added to ``compute_seconds[fn.__name__]``."""
        t0 = time.thread_time()
        try:
            return fn(*args)
        finally:
            name = getattr(fn, "__name__", "other").lstrip("_")
            self.compute_seconds[name] = self.compute_seconds.get(name, 0.0) + time.thread_time() - t0

    async def _heartbeat_loop(self, interval: float) -> None:
        """A heartbeat whenever the coordinator has not heard from this client for
        ``interval`` and no call is in flight (every call it serves refreshes the client's
        last-seen time, at its start and when it answers): a client busy polling or
        up/downloading sends none. A call in flight is bounded (the client's deadline; the
        coordinator holds an idle GetTask at most half the client timeout, refreshing the
        client when it answers), so an idle client costs one GetTask per hold instead of a
        GetTask plus heartbeats while it is held."""
        while True:
            wait = self._last_contact + interval - time.monotonic()
            if wait > 0 or self._calls:
                await asyncio.sleep(wait if wait > 0 else interval)
                continue
            self._last_contact = time.monotonic()
            try:
                await self.client.heartbeat(**self._heartbeat_request())
            except grpc.RpcError:
                pass

    async def run(self) -> int:
        self.client = AsyncCoordinatorClient(self.opts.target, self.opts.token, tls=self.opts.tls, timeout=60)
        try:
            return await self._drive(self._session())
        finally:
            if self._hb is not None:
                self._hb.cancel()      # cancels a heartbeat in flight before the channel closes
                try:
                    await self._hb
                except asyncio.CancelledError:
                    pass
            await self.client.close()


def run_clients(target: str, clients: list[tuple[str, str, ClientData]], state_root, tls=None,
                compute_threads: int = 1, log=lambda m: None, durable: bool = True
                ) -> list[tuple[str, AsyncWorker, int, str]]:
    """Run every client to its end on one new event loop: (name, worker, exit code, error) each.
    An exception of one client is its error (exit 1); the others run on. ``durable``: see
    :class:`~fedmla.worker.runtime.WorkerOptions`."""
    from pathlib import Path

    async def main(executor):
        cache = ComputeCache()      # the seeded start, downloads and trainers, shared by this loop's clients
        workers = [(name, AsyncWorker(WorkerOptions(target, token, Path(state_root) / name, tls=tls, log=log,
                                                    durable=durable),
                                      data, executor, cache)) for name, token, data in clients]
        codes = await asyncio.gather(*(w.run() for _, w in workers), return_exceptions=True)
        return [(name, w, 1 if isinstance(c, BaseException) else c,
                 f"{type(c).__name__}: {c}" if isinstance(c, BaseException) else "")
                for (name, w), c in zip(workers, codes)]

    # The loop runs in a thread of its own: asyncio.run leaves its thread without an event
    # loop, and gRPC's asyncio layer started later in the caller's thread (an in-process
    # coordinator) would then find none.
    executor = ThreadPoolExecutor(compute_threads, thread_name_prefix="fedmla-compute") if compute_threads else None
    result: dict = {}

    def loop_thread():
        try:
            result["out"] = asyncio.run(main(executor))
        except BaseException as e:      # re-raised in the caller's thread
            result["error"] = e
    t = threading.Thread(target=loop_thread, name="fedmla-clients")
    try:
        t.start()
        t.join()
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
    if "error" in result:
        raise result["error"]
    return result["out"]
