"""gRPC front end of the coordinator (grpc.aio): auth interceptor, thin servicers,
health service, TLS / mutual TLS, metrics endpoint and graceful shutdown.

In-process use (tests, simulations)::

    server = CoordinatorServer(CoordinatorSettings(store=..., port=0))
    await server.start()            # binds, loads/creates the store, starts the round driver
    ... connect to f"127.0.0.1:{server.port}" ...
    await server.stop()

As a process: ``fedmla coordinator --config FILE`` (see :func:`serve`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import time
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import coordinator_pb2_grpc as cpb_grpc

from .errors import CoordinatorError, InvalidArgument, ResourceExhausted
from .metrics import CoordinatorMetrics
from fedmla.protos.limits import CHUNK_BYTES, MAX_MESSAGE_BYTES, clip_status

from .rounds import Coordinator
from .settings import CoordinatorSettings
from .store import Store, TokenChecker

log = logging.getLogger("fedmla.coordinator")

SERVICE_NAME = "fedmla.v1.CoordinatorService"
CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("fedmla_client")
_UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value[7:].strip() if value.lower().startswith("bearer ") else value
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Resolves ``authorization: Bearer <token>`` to a client name (constant-time
    compare, revocation honoured) and runs the handler with it in :data:`CLIENT`;
    refuses the call with UNAUTHENTICATED otherwise. The health service is open."""

    def __init__(self, tokens: TokenChecker, metrics: CoordinatorMetrics):
        self.tokens = tokens
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_UNAUTHENTICATED_PREFIXES):
            return handler
        try:
            client = self.tokens.client_for(_bearer(details.invocation_metadata))
            error = None
        except CoordinatorError as e:
            self.metrics.rejections.labels(e.reason).inc()
            client, error = None, e
        return _wrap(handler, client, error)


def _wrap(h: grpc.RpcMethodHandler, client: str | None, error: CoordinatorError | None) -> grpc.RpcMethodHandler:
    async def refuse(context):
        await context.abort(grpc.StatusCode[error.code], clip_status(error.message))

    if h.request_streaming and h.response_streaming:
        raise NotImplementedError("no bidirectional methods in this service")
    if h.response_streaming:
        async def unary_stream(request, context):
            if error:
                await refuse(context)
            CLIENT.set(client)
            async for item in h.unary_stream(request, context):
                yield item
        return grpc.unary_stream_rpc_method_handler(unary_stream, h.request_deserializer, h.response_serializer)
    if h.request_streaming:
        async def stream_unary(requests, context):
            if error:
                await refuse(context)
            CLIENT.set(client)
            return await h.stream_unary(requests, context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, h.request_deserializer, h.response_serializer)

    async def unary_unary(request, context):
        if error:
            await refuse(context)
        CLIENT.set(client)
        return await h.unary_unary(request, context)
    return grpc.unary_unary_rpc_method_handler(unary_unary, h.request_deserializer, h.response_serializer)


async def _abort(context, e: CoordinatorError):
    # Every status goes out cut to MAX_STATUS_CHARS: a longer one would not fit the
    # peer's metadata limit and the refusal would never reach the client.
    await context.abort(grpc.StatusCode[e.code], clip_status(e.message))


class RateLimitedLog:
    """One WARNING line per ``interval_s`` per kind of event, with the count of the ones
    not logged since: events anyone can cause (bytes that do not parse, sent to a port
    open to all) must not flood the log."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0):
        self.logger, self.interval_s = logger, interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str) -> bool:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        n = self._suppressed.pop(kind, 0)
        self.logger.warning("%s%s", message, f" ({n} more like it in the last {self.interval_s:g}s not logged)"
                            if n else "")
        return True


REFUSALS_LOG = RateLimitedLog(log)


class CoordinatorServicer(cpb_grpc.CoordinatorServiceServicer):
    """Thin: unpack, call the handler, map :class:`CoordinatorError` to a status."""

    def __init__(self, coord: Coordinator):
        self.coord = coord
        self._downloading: dict[str, int] = {}    # client -> DownloadModel streams in flight

    async def Join(self, request, context):
        try:
            return self.coord.join(CLIENT.get(), request)
        except CoordinatorError as e:
            await _abort(context, e)

    async def GetTask(self, request, context):
        try:
            left = context.time_remaining()     # the caller's deadline bounds the long poll
            return await self.coord.wait_task(CLIENT.get(), None if left is None else left - 1.0)
        except CoordinatorError as e:
            await _abort(context, e)

    async def Heartbeat(self, request, context):
        try:
            return self.coord.heartbeat(CLIENT.get(), request)
        except CoordinatorError as e:
            await _abort(context, e)

    async def Leave(self, request, context):
        try:
            return self.coord.leave(CLIENT.get(), request)
        except CoordinatorError as e:
            await _abort(context, e)

    async def DownloadModel(self, request, context):
        client = CLIENT.get()
        try:
            if self._downloading.get(client, 0) >= MAX_DOWNLOADS_PER_CLIENT:
                # A stream the client does not read holds a chunk until its deadline: bounded per client.
                raise ResourceExhausted(f"client {client!r} has {MAX_DOWNLOADS_PER_CLIENT} downloads in flight; "
                                        f"read or cancel them first", "downloads_in_flight")
            header, data = self.coord.download(client, request)
        except CoordinatorError as e:
            await _abort(context, e)
            return
        self._downloading[client] = self._downloading.get(client, 0) + 1
        try:
            view = memoryview(data)
            yield cpb.DownloadModelResponse(header=header, data=bytes(view[:CHUNK_BYTES]))
            for off in range(CHUNK_BYTES, len(data), CHUNK_BYTES):
                yield cpb.DownloadModelResponse(data=bytes(view[off: off + CHUNK_BYTES]))
        finally:
            left = self._downloading.pop(client) - 1
            if left:
                self._downloading[client] = left

    async def SubmitUpdate(self, request_iterator, context):
        try:
            return await self.coord.submit(CLIENT.get(), request_iterator)
        except CoordinatorError as e:
            if e.reason == "truncated":
                # A stream that stops short is either a client that died mid-upload (gRPC cancels
                # this call a moment later: a dropout) or a live client that sent too little (a
                # refusal). Give the cancellation a moment to arrive before deciding.
                try:
                    await asyncio.sleep(TRUNCATION_GRACE_S)
                except asyncio.CancelledError:
                    self.coord.upload_lost(CLIENT.get())
                    raise
            await _abort(context, e)


TRUNCATION_GRACE_S = 1.0
MAX_DOWNLOADS_PER_CLIENT = 2

SERVICE = "fedmla.v1.CoordinatorService"


class _Unparsed:
    """Request bytes that are not a message of the RPC's request type."""

    def __init__(self, type_name: str, error: str):
        self.type_name, self.error = type_name, error

    def refusal(self) -> InvalidArgument:
        REFUSALS_LOG.warning(f"unparsed:{self.type_name}",
                             f"refused a request that is not a serialized {self.type_name}")
        return InvalidArgument(f"request is not a serialized {self.type_name} ({self.error})", "malformed")


def _safe_parser(cls):
    """A request deserializer that never raises: grpc would answer its own UNKNOWN; the
    servicer answers INVALID_ARGUMENT naming the expected message type instead."""
    def parse(raw: bytes):
        try:
            return cls.FromString(raw)
        except DecodeError as e:
            return _Unparsed(cls.DESCRIPTOR.full_name, str(e) or "malformed protobuf")
    return parse


def _checked_unary(method):
    async def handler(request, context):
        if isinstance(request, _Unparsed):
            await _abort(context, request.refusal())
        return await method(request, context)
    return handler


def _checked_unary_stream(method):
    async def handler(request, context):
        if isinstance(request, _Unparsed):
            await _abort(context, request.refusal())
        async for item in method(request, context):
            yield item
    return handler


async def _checked_stream(requests):
    async for r in requests:
        if isinstance(r, _Unparsed):
            raise r.refusal()
        yield r


def add_servicer(servicer: "CoordinatorServicer", server) -> None:
    """Register the coordinator's RPCs (the generated registration, with safe request parsing)."""
    out = lambda m: m.SerializeToString()  # noqa: E731
    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(_checked_unary(servicer.Join), _safe_parser(cpb.JoinRequest), out),
        "GetTask": grpc.unary_unary_rpc_method_handler(_checked_unary(servicer.GetTask),
                                                       _safe_parser(cpb.GetTaskRequest), out),
        "DownloadModel": grpc.unary_stream_rpc_method_handler(_checked_unary_stream(servicer.DownloadModel),
                                                              _safe_parser(cpb.DownloadModelRequest), out),
        "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
            lambda requests, context: servicer.SubmitUpdate(_checked_stream(requests), context),
            _safe_parser(cpb.SubmitUpdateRequest), out),
        "Heartbeat": grpc.unary_unary_rpc_method_handler(_checked_unary(servicer.Heartbeat),
                                                         _safe_parser(cpb.HeartbeatRequest), out),
        "Leave": grpc.unary_unary_rpc_method_handler(_checked_unary(servicer.Leave), _safe_parser(cpb.LeaveRequest),
                                                     out),
    }
    assert set(handlers) == set(cpb.DESCRIPTOR.services_by_name["CoordinatorService"].methods_by_name)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


HEALTH_SERVICE = "grpc.health.v1.Health"
MAX_HEALTH_SERVICE_CHARS = 256   # the service names asked about are ours; nothing longer is
MAX_HEALTH_WATCHES = 64          # Watch streams open at once (the health service needs no token)


def add_health_servicer(servicer: HealthServicer, server) -> None:
    """The standard health service with the same safe request parsing as the coordinator's
    RPCs: bytes that do not parse get INVALID_ARGUMENT (grpc's own registration answers
    UNKNOWN and logs a traceback each time, a log flood open to anyone who reaches the port)."""
    out = lambda m: m.SerializeToString()  # noqa: E731
    parse = _safe_parser(health_pb2.HealthCheckRequest)
    watching = [0]

    async def refuse_bad(request, context):
        if isinstance(request, _Unparsed):
            await _abort(context, request.refusal())
        if len(request.service) > MAX_HEALTH_SERVICE_CHARS:
            await _abort(context, InvalidArgument(f"service name of {len(request.service)} characters; at most "
                                                  f"{MAX_HEALTH_SERVICE_CHARS}", "malformed"))

    async def check(request, context):
        await refuse_bad(request, context)
        return await servicer.Check(request, context)

    async def watch(request, context):
        await refuse_bad(request, context)
        if watching[0] >= MAX_HEALTH_WATCHES:
            await _abort(context, ResourceExhausted(f"{MAX_HEALTH_WATCHES} health watches are open already; "
                                                    f"use Check", "health_watches"))
        watching[0] += 1
        try:
            await servicer.Watch(request, context)
        finally:
            watching[0] -= 1

    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(check, parse, out),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, parse, out),
    }
    assert set(handlers) == set(health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HEALTH_SERVICE, handlers),))
    server.add_registered_method_handlers(HEALTH_SERVICE, handlers)


def server_credentials(settings: CoordinatorSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None:
        return None
    try:
        key, cert = Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes()
        ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    except OSError as e:
        raise ValueError(f"cannot read TLS file: {e}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class CoordinatorServer:
    """A coordinator and its gRPC server in the current event loop."""

    def __init__(self, settings: CoordinatorSettings, store: Store | None = None,
                 metrics: CoordinatorMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or CoordinatorMetrics()
        self.store = store or Store(settings.store)
        self.coord = Coordinator(settings, self.store, self.metrics)
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._driver: asyncio.Task | None = None
        self._metrics_http = None
        self.health = HealthServicer()
        self.dashboard = None          # DashboardServer when settings.dashboard_port is set

    async def start(self) -> int:
        s = self.settings
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                # Bound what the transport buffers for streams we have not read yet: no
                # window growth by BDP probing, a 64 KiB window per stream. Together with
                # the upload slots this keeps memory flat in the number of clients.
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", 64 << 10)]
        server = grpc.aio.server(interceptors=[AuthInterceptor(TokenChecker(self.store), self.metrics)], options=opts)
        self.servicer = CoordinatorServicer(self.coord)
        add_servicer(self.servicer, server)
        add_health_servicer(self.health, server)
        addr = f"{s.host}:{s.port}"
        creds = server_credentials(s)
        port = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
        if port == 0:
            raise OSError(f"could not bind the gRPC server to {addr}")
        await server.start()
        self._server, self.port = server, port
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if s.metrics_port is not None:
            from prometheus_client import start_http_server
            self._metrics_http = start_http_server(s.metrics_port, s.metrics_host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_http[0].server_port
        if s.dashboard_port is not None:
            self._start_dashboard()
        self._driver = asyncio.create_task(self._drive(), name="fedmla-rounds")
        if s.port_file:
            tmp = Path(str(s.port_file) + ".tmp")
            tmp.write_text(str(port))
            tmp.replace(s.port_file)
        log.info("coordinator serving on %s:%d (%s)", s.host, port,
                 "mutual TLS" if s.tls_client_ca else "TLS" if creds else "insecure")
        return port

    def _start_dashboard(self) -> None:
        """The run's dashboard on its own HTTP port: the store's history plus the open round."""
        from .dashboard import DashboardServer, OverlaySource, RoundRecord
        from .dashboard.sqlite_source import SqliteSource
        s = self.settings
        source = OverlaySource(SqliteSource(self.store.root))
        self.dashboard = DashboardServer(source, host=s.dashboard_host, port=s.dashboard_port,
                                         token=s.dashboard_token).start()
        self.dashboard_source = source

        async def feed():
            last = None
            while True:
                live = self.coord.live_round()
                if live is not None and live != last:
                    source.live.put_round(RoundRecord(**live))
                last = live
                await asyncio.sleep(0.25)
        self._dashboard_feed = asyncio.create_task(feed(), name="fedmla-dashboard-feed")
        log.info("dashboard on %s%s", self.dashboard.url, " (token required)" if s.dashboard_token else "")

    async def _drive(self) -> None:
        try:
            await self.coord.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("round driver failed; the server keeps serving but runs no more rounds")
            raise

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.coord.notify_tasks()          # release held GetTask calls
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except (asyncio.CancelledError, Exception):
                pass
        if self.coord.closing_task is not None and not self.coord.closing_task.done():
            try:
                await self.coord.closing_task
            except Exception:
                log.exception("commit of the last round failed during shutdown")
        if self._server is not None:
            await self._server.stop(grace)
        if self.dashboard is not None:
            self._dashboard_feed.cancel()
            self.dashboard.stop()
            self.dashboard_source.store.close()
        if self._metrics_http is not None:
            self._metrics_http[0].shutdown()
            self._metrics_http[0].server_close()
        self.store.close()


async def serve(settings: CoordinatorSettings) -> None:
    """Run a coordinator until SIGTERM/SIGINT; then stop gracefully."""
    server = CoordinatorServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", settings.shutdown_grace_s)
    await server.stop()
