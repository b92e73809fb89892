"""`fedmla dashboard --store PATH`: serve the dashboard of a run from its store, read-only."""

from __future__ import annotations

import ipaddress
import signal
import threading
from pathlib import Path

import typer

DEFAULT_PORT = 8765


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer, bench: typer.Typer) -> None:
    @app.command("dashboard")
    def dashboard(
        store: Path = typer.Option(..., "--store", help="the coordinator's store directory (as given to the coordinator), "
                                                        "or its fedmla.sqlite; opened read-only"),
        host: str = typer.Option("127.0.0.1", help="address to listen on; anything but loopback exposes the run"),
        port: int = typer.Option(DEFAULT_PORT, min=0, max=65535, help="port to listen on (0: any free port)"),
        token: str | None = typer.Option(None, envvar="FEDMLA_DASHBOARD_TOKEN",
                                         help="require this token (Authorization: Bearer, or ?token=) on the page and API"),
        poll_interval: float = typer.Option(1.0, min=0.05, help="seconds between checks of the store for changes"),
    ) -> None:
        """Serve the web dashboard (and its JSON API) of a run's store, with no coordinator needed.

        Works on a finished run and on a store a coordinator is still writing (the page updates live). Stop with Ctrl-C.
        """
        from .server import DashboardServer
        from .sqlite_source import SqliteSource, StoreError

        if token is not None and not token:
            raise typer.BadParameter("must not be empty", param_hint="--token")
        try:
            source = SqliteSource(store)
        except StoreError as e:
            raise typer.BadParameter(str(e), param_hint="--store") from None
        if not _is_loopback(host) and token is None:
            typer.echo(f"warning: serving on {host} without --token: anyone who can reach this port sees the run", err=True)
        server = DashboardServer(source, host=host, port=port, token=token, poll_interval=poll_interval)
        try:
            server.start()
        except OSError as e:
            source.close()
            raise typer.BadParameter(str(e), param_hint="--port") from None
        done = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: done.set())
        url = server.url + ("?token=<token>" if token else "")
        typer.echo(f"fedmla dashboard of run {source.run().run_id!r} from {store} at {url}", color=False)
        typer.echo(f"JSON API: {server.url}openapi.json   (Ctrl-C to stop)")
        try:
            while not done.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            server.stop()
            source.close()
