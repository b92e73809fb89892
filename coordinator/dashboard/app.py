"""The dashboard's web application: a static page, a read-only JSON API, a live event stream.

``create_app(source, token=None)`` builds a FastAPI app over any
:class:`~coordinator.dashboard.source.DashboardSource`. Every route is a GET; the
OpenAPI description is at ``/openapi.json``. With a token set, every route except
the shipped JavaScript under ``/static/`` requires it, as ``Authorization: Bearer
<token>`` or ``?token=<token>`` (the page passes the one it was opened with on).
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import AsyncIterable
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

import anyio
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .source import ClientRoundRecord, DashboardSource
from .views import (ClientView, HeadImportanceView, LiveUpdate, RoundView, RunView, Summary, client_views,
                    head_importance_view, live_update, round_views, run_view, summary)

STATIC_DIR = Path(__file__).parent / "static"


def plotly_js_path() -> Path:
    """plotly.js as shipped in the installed ``plotly`` wheel; the page loads it from us, not a CDN."""
    path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    if not path.is_file():
        raise RuntimeError(f"plotly.min.js not found at {path}: reinstall the 'plotly' package (bash deploy/install.sh)")
    return path


class SourceError(RuntimeError):
    """The source could not be read (e.g. the store file went away). Served as 503."""


class Health(BaseModel):
    status: str = "ok"
    run_id: str
    version: int


class RoundDetail(BaseModel):
    round: RoundView
    clients: list[ClientRoundRecord] = Field(description="every client's part in this round, by name")


class ClientDetail(BaseModel):
    client: ClientView
    rounds: list[ClientRoundRecord] = Field(description="this client's part in every round it joined, by round")


class HeadImportanceIndex(BaseModel):
    rounds: list[int] = Field(description="rounds with recorded head importance, increasing")


# ---- read-only + token gate ------------------------------------------------------------
class _Gate:
    """ASGI middleware: refuse anything but GET, and check the token when one is set."""

    def __init__(self, app, token: str | None, public_prefixes: tuple[str, ...] = ("/static/",)) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.public_prefixes = public_prefixes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] != "GET":
            return await self._deny(scope, receive, send, 405, "the dashboard is read-only: only GET is allowed",
                                    {"allow": "GET"})
        if self.token is not None and not scope["path"].startswith(self.public_prefixes):
            given = self._given_token(scope)
            if given is None:
                return await self._deny(scope, receive, send, 401,
                                        "dashboard token missing: send 'Authorization: Bearer <token>' or add ?token=<token> to the URL",
                                        {"www-authenticate": "Bearer"})
            if not hmac.compare_digest(given, self.token):
                return await self._deny(scope, receive, send, 401, "dashboard token is wrong", {"www-authenticate": "Bearer"})
        return await self.app(scope, receive, send)

    @staticmethod
    def _given_token(scope) -> bytes | None:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return credentials.strip()
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in query:
            return query["token"][-1].encode("latin-1")
        return None

    @staticmethod
    async def _deny(scope, receive, send, status: int, detail: str, headers: dict[str, str]) -> None:
        await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


# ---- the app -------------------------------------------------------------------------
def create_app(source: DashboardSource, token: str | None = None, poll_interval: float = 0.5,
               stopping: threading.Event | None = None) -> FastAPI:
    """The dashboard app over ``source``.

    ``poll_interval`` is how often (seconds) the event stream asks the source whether
    it changed. ``stopping``, when set, ends every open event stream so that a server
    can shut down promptly.
    """
    if token is not None and not token:
        raise ValueError("dashboard token must be a non-empty string (or None for no token)")
    plotly_js = plotly_js_path()
    stopping = stopping or threading.Event()

    app = FastAPI(
        title="fedmla dashboard API",
        version="1",
        summary="Read-only view of one federated MLA training run: rounds, communication, head importance, clients.",
        description=(
            "Every endpoint is a GET returning JSON, except `/api/events` (server-sent events). "
            "When the dashboard was started with a token, send it as `Authorization: Bearer <token>` "
            "or `?token=<token>`. Losses are in nats per token; bytes are serialized protobuf bytes; "
            "times are unix seconds."
        ),
        docs_url=None,  # Swagger UI and ReDoc load from a CDN; the dashboard must work offline
        redoc_url=None,
    )
    app.state.source = source
    app.state.stopping = stopping

    @app.exception_handler(SourceError)
    async def _source_error(request: Request, exc: SourceError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    def read(fn, *args):
        try:
            return fn(*args)
        except SourceError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken source is reported, not a stack trace
            raise SourceError(f"could not read the run: {type(e).__name__}: {e}") from e

    # ---- page and its scripts --------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/static/dashboard.js", include_in_schema=False)
    def dashboard_js() -> FileResponse:
        return FileResponse(STATIC_DIR / "dashboard.js", media_type="text/javascript")

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_min_js() -> FileResponse:
        return FileResponse(plotly_js, media_type="text/javascript", headers={"cache-control": "max-age=86400"})

    # ---- JSON API --------------------------------------------------------------------
    @app.get("/api/health", response_model=Health, tags=["run"])
    def health() -> Health:
        """Liveness: the source answers. ``version`` is its change counter."""
        return Health(run_id=read(source.run).run_id, version=read(source.version))

    @app.get("/api/summary", response_model=Summary, tags=["run"])
    def get_summary() -> Summary:
        """Headline numbers: current round, latest losses, total bytes, ratio against FedAvg, clients by status."""
        version = read(source.version)
        return summary(version, read(source.run), round_views(read(source.rounds)), read(source.clients))

    @app.get("/api/run", response_model=RunView, tags=["run"])
    def get_run() -> RunView:
        """Run id, schema version, the run configuration and the model summary
        (parameters, KV-cache bytes per token) when the configuration names a model."""
        return run_view(read(source.run))

    @app.get("/api/rounds", response_model=list[RoundView], tags=["rounds"])
    def get_rounds(since: int = Query(0, ge=0, description="only rounds with id >= since")) -> list[RoundView]:
        """Every round with losses, perplexities, duration, client counts, bytes (per round and
        cumulative) and the per-round and running ratio against FedAvg in fp32."""
        return [r for r in round_views(read(source.rounds)) if r.id >= since]

    @app.get("/api/rounds/{round_id}", response_model=RoundDetail, tags=["rounds"])
    def get_round(round_id: int) -> RoundDetail:
        """One round and every client's part in it (bytes, local loss, examples, rejection reason)."""
        views = {r.id: r for r in round_views(read(source.rounds))}
        if round_id not in views:
            raise HTTPException(404, f"round {round_id} not found in run {read(source.run).run_id!r}")
        return RoundDetail(round=views[round_id], clients=read(source.client_rounds, round_id, None))

    @app.get("/api/clients", response_model=list[ClientView], tags=["clients"])
    def get_clients() -> list[ClientView]:
        """Every client: status, last seen, rounds joined, bytes, and its latest round's local loss and rejection reason."""
        return client_views(read(source.clients), read(source.latest_client_rounds))

    @app.get("/api/clients/{name}", response_model=ClientDetail, tags=["clients"])
    def get_client(name: str) -> ClientDetail:
        """One client and its part in every round it joined."""
        views = {c.name: c for c in client_views(read(source.clients), read(source.latest_client_rounds))}
        if name not in views:
            raise HTTPException(404, f"client {name!r} not found in run {read(source.run).run_id!r}")
        return ClientDetail(client=views[name], rounds=read(source.client_rounds, None, name))

    @app.get("/api/head-importance", response_model=HeadImportanceIndex, tags=["head importance"])
    def get_head_importance_index() -> HeadImportanceIndex:
        """Which rounds have recorded head importance."""
        return HeadImportanceIndex(rounds=read(source.head_importance_rounds))

    @app.get("/api/head-importance/latest", response_model=HeadImportanceView, tags=["head importance"])
    def get_head_importance_latest() -> HeadImportanceView:
        """Head importance (layers x heads) and active-head mask of the latest round that has one."""
        rounds = read(source.head_importance_rounds)
        rec = read(source.head_importance, rounds[-1]) if rounds else None
        if rec is None:
            raise HTTPException(404, "no head importance recorded yet")
        return head_importance_view(rec)

    @app.get("/api/head-importance/{round_id}", response_model=HeadImportanceView, tags=["head importance"])
    def get_head_importance(round_id: int) -> HeadImportanceView:
        """Head importance (layers x heads) and active-head mask after one round."""
        rec = read(source.head_importance, round_id)
        if rec is None:
            raise HTTPException(404, f"no head importance recorded for round {round_id}")
        return head_importance_view(rec)

    @app.get("/api/events", response_class=EventSourceResponse, tags=["live"],
             responses={200: {"description": "A stream of `update` events whose data is a LiveUpdate (JSON)",
                              "content": {"text/event-stream": {"schema": _live_update_schema()}}}})
    async def events(request: Request) -> AsyncIterable[ServerSentEvent]:
        """Server-sent events for live pages. The first `update` carries every round (`full`);
        later ones, sent whenever the source changes, carry the rounds with id >= `rounds_from`
        (older ended rounds never change; see views.open_frontier), plus summary, run, clients and
        the latest head importance."""
        rounds_from: int | None = None
        last_version: int | None = None
        while not stopping.is_set():
            version = await run_in_threadpool(read, source.version)
            if version != last_version:
                update, next_from = await run_in_threadpool(read, live_update, source, rounds_from)
                yield ServerSentEvent(raw_data=update.model_dump_json(), event="update", id=str(update.version))
                last_version, rounds_from = update.version, next_from
            await anyio.sleep(poll_interval)

    app.add_middleware(_Gate, token=token)
    return app


def _live_update_schema() -> dict:
    # Nested models are already components (other endpoints return them); point at those.
    schema = LiveUpdate.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema
