"""How the coordinator's RPCs and the health service are registered with grpc.aio: request
parsers that never raise (bytes that do not parse get INVALID_ARGUMENT naming the
expected message, not grpc's UNKNOWN with a logged traceback), bounded health requests,
statuses cut to a size the peer accepts, and a rate-limited log of such refusals."""

from __future__ import annotations

import logging
import time

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.limits import clip_status

from .errors import CoordinatorError, InvalidArgument, ResourceExhausted

log = logging.getLogger("fedmla.coordinator")

SERVICE = "fedmla.v1.CoordinatorService"

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


def add_servicer(servicer, server) -> None:
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


