"""gRPC front end of the coordinator (grpc.aio): auth interceptor, thin servicers,
health service, TLS / mutual TLS, metrics endpoint and graceful shutdown (how the RPCs
are registered, with safe request parsing, is in :mod:`.registration`).

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
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import coordinator_pb2_grpc as cpb_grpc

from .errors import CoordinatorError, ResourceExhausted
from .metrics import CoordinatorMetrics
from fedmla.protos.limits import CHUNK_BYTES, MAX_MESSAGE_BYTES, clip_status

from .registration import _abort, add_health_servicer, add_servicer
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
        # The exact sum's compiled kernels (numba: compiled once, then loaded from its disk
        # cache) before the first update arrives, not inside it.
        from fedmla.protos.codec.batch_decode import warm_up as warm_up_decode
        from fedmla.protos.codec.exact import warm_up
        t0 = time.perf_counter()
        compiled = await asyncio.to_thread(lambda: warm_up() & warm_up_decode())
        log.info("exact-sum kernels %s in %.2fs", "ready" if compiled else "absent (numpy path)",
                 time.perf_counter() - t0)
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
        self.coord.ingest.close()
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
