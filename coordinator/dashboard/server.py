"""Serving the dashboard from a background thread, so a coordinator can embed it.

    server = DashboardServer(source, host="127.0.0.1", port=0).start()
    print(server.url)       # the actual port when 0 was asked for
    ...
    server.stop()
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from .app import create_app
from .source import DashboardSource


class DashboardServer:
    """Runs the dashboard app with uvicorn on its own thread and event loop.

    The listening socket is bound in :meth:`start` (in the caller's thread), so a
    port already in use raises there, and ``port`` is the real one afterwards.
    """

    def __init__(self, source: DashboardSource, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 poll_interval: float = 0.5) -> None:
        self.source = source
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._stopping = threading.Event()
        self.app = create_app(source, token=token, poll_interval=poll_interval, stopping=self._stopping)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the dashboard server is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 30.0) -> "DashboardServer":
        if self._thread is not None:
            raise RuntimeError("the dashboard server is already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"dashboard cannot listen on {self.host}:{self.requested_port}: {e.strerror}") from e
        sock.listen(128)
        sock.set_inheritable(True)
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off", ws="none",
                                timeout_graceful_shutdown=3)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"fedmla-dashboard:{self.port}", daemon=True)
        self._thread.start()
        # Wait until uvicorn serves, or died trying.
        deadline = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"dashboard server did not start on {self.host}:{self.port}: {self._error!r}")
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._socket]))
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e

    def stop(self, timeout: float = 10.0) -> None:
        """Close event streams, stop serving and join the thread. Safe to call twice."""
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> "DashboardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
