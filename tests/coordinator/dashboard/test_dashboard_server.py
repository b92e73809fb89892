"""DashboardServer: port 0, real port exposed, clean stop even with a live event stream."""

import socket
import threading

import httpx
import pytest

from fedmla.coordinator.dashboard import DashboardServer, InMemorySource


def test_port_zero_serves_on_the_reported_port_and_stop_closes_it():
    server = DashboardServer(InMemorySource("r1"), port=0).start()
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/"
        assert httpx.get(server.url + "api/health").json()["run_id"] == "r1"
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/api/health")
    server.stop()  # twice is fine


def test_stop_ends_open_event_streams():
    server = DashboardServer(InMemorySource("r"), poll_interval=0.05).start()
    got_first = threading.Event()
    ended = threading.Event()

    def listen():
        try:
            with httpx.stream("GET", server.url + "api/events", timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        got_first.set()
        except httpx.HTTPError:
            pass
        ended.set()

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert got_first.wait(30)
    thread = server._thread
    server.stop()
    assert not thread.is_alive()
    assert ended.wait(30)  # the client saw the stream end rather than hang
    t.join(5)


def test_busy_port_is_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"dashboard cannot listen on 127.0.0.1:{port}"):
            DashboardServer(InMemorySource("r"), port=port).start()


def test_context_manager_and_no_double_start():
    with DashboardServer(InMemorySource("r")) as server:
        assert httpx.get(server.url + "api/summary").status_code == 200
        with pytest.raises(RuntimeError, match="already started"):
            server.start()
    with pytest.raises(RuntimeError, match="not started"):
        DashboardServer(InMemorySource("r")).url
