"""Run a coordinator on a background thread's event loop (tests, notebooks, simulations).

    with BackgroundCoordinator(CoordinatorSettings(store=tmp, port=0)) as bg:
        client = CoordinatorClient(bg.target, bg.store.create_token("alice"))
        ...
        bg.call(lambda: bg.server.coord.round)   # run a function on the server's loop
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import grpc

from .server import CoordinatorServer
from .settings import CoordinatorSettings


class BackgroundCoordinator:
    def __init__(self, settings: CoordinatorSettings, **server_kwargs):
        self.settings = settings
        self._kwargs = server_kwargs
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fedmla-coordinator", daemon=True)
        self.server: CoordinatorServer | None = None
        self._aio_held = False

    def start(self) -> "BackgroundCoordinator":
        # gRPC's asyncio layer is reference-counted per process; when the server's stop drops
        # the count to zero, its poller's socket closes while a read callback may already be
        # queued on our loop, which then prints an EBADF traceback. Holding a reference until
        # the loop is closed (stop) makes the shutdown happen with nothing left to run.
        self._thread.start()
        self.call(grpc.aio.init_grpc_aio)       # on the loop's thread: it needs a running loop there
        self._aio_held = True

        async def _start():
            self.server = CoordinatorServer(self.settings, **self._kwargs)
            await self.server.start()
        try:
            self.run(_start())
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()
            self._aio_held = False
            grpc.aio.shutdown_grpc_aio()
            raise
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"{self.settings.host}:{self.server.port}"

    @property
    def store(self):
        return self.server.store

    @property
    def coord(self):
        return self.server.coord

    def run(self, coro, timeout: float | None = 60):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, timeout: float | None = 60):
        """Run a plain function on the server's loop (safe access to coordinator state)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def _do():
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)
        self.loop.call_soon_threadsafe(_do)
        return fut.result(timeout)

    def stop(self, grace: float = 0.5) -> None:
        if self.server is not None:
            self.run(self.server.stop(grace))
            self.server = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()
        if self._aio_held:
            self._aio_held = False
            grpc.aio.shutdown_grpc_aio()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
