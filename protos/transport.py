"""gRPC client of the coordinator, for workers, simulations, tests and benchmarks.

Two flavours with the same methods: :class:`CoordinatorClient` (blocking) and
:class:`AsyncCoordinatorClient` (grpc.aio, ``await`` every call). Every call carries
``authorization: Bearer <token>``; refusals surface as ``grpc.RpcError`` /
``grpc.aio.AioRpcError`` with the coordinator's status code and message.

    client = CoordinatorClient("127.0.0.1:50051", token, tls=TLSConfig(root_ca=ca_pem))
    client.join(device="cpu", num_examples=1000)
    reply = client.get_task()                  # READY -> reply.task
    dl = client.download(since_version=None)   # payload checked against its SHA-256
    client.submit(update, reply.task.round_id, reply.task.model.version)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import coordinator_pb2_grpc as cpb_grpc
from fedmla.protos.fedmla.v1 import types_pb2 as pb

from .limits import CHUNK_BYTES, MAX_MESSAGE_BYTES


class ModelIntegrityError(RuntimeError):
    """A downloaded model's bytes do not hash to what the coordinator announced."""


@dataclass(frozen=True)
class TLSConfig:
    """PEM bytes or paths. ``cert``/``key`` present a client certificate (mutual TLS);
    ``server_name`` overrides the name checked against the server certificate."""

    root_ca: bytes | str | Path | None = None
    cert: bytes | str | Path | None = None
    key: bytes | str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def pem(x):
            return None if x is None else x if isinstance(x, bytes) else Path(x).read_bytes()
        return grpc.ssl_channel_credentials(pem(self.root_ca), pem(self.key), pem(self.cert))


@dataclass(frozen=True)
class DownloadedModel:
    kind: int                       # DownloadModelResponse.FULL or DELTA
    model: pb.ModelVersion          # the version after applying
    base_version: int
    data: bytes                     # safetensors bytes (whole model or changed tensors)


def _options(tls: TLSConfig | None) -> list:
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return opts


def capabilities(device: str = "cpu", free_memory_bytes: int = 0, num_examples: int = 0,
                 software_version: str = "", **extra: str) -> pb.ClientCapabilities:
    return pb.ClientCapabilities(device=device, free_memory_bytes=free_memory_bytes, num_examples=num_examples,
                                 software_version=software_version, extra={k: str(v) for k, v in extra.items()})


def submit_requests(payload: bytes, round_id: int, model_version: int, chunk_bytes: int = CHUNK_BYTES):
    """The SubmitUpdate request stream for a serialized ModelUpdate: the header alone,
    then the payload in chunks. (A coordinator takes an upload slot once the header has
    arrived; the data it has not read yet waits in the sender's HTTP/2 stream window
    instead of in its memory while a thousand clients queue for the slots.)"""
    header = cpb.SubmitUpdateRequest.Header(round_id=round_id, model_version=model_version,
                                            total_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
    view = memoryview(payload)
    yield cpb.SubmitUpdateRequest(header=header)
    for off in range(0, len(payload), chunk_bytes):
        yield cpb.SubmitUpdateRequest(data=bytes(view[off: off + chunk_bytes]))


def _assemble(header: cpb.DownloadModelResponse.Header | None, parts: list[bytes]) -> DownloadedModel:
    if header is None:
        raise ModelIntegrityError("download stream carried no header")
    data = b"".join(parts)
    if len(data) != header.total_bytes or hashlib.sha256(data).hexdigest() != header.payload_sha256:
        raise ModelIntegrityError(f"downloaded {len(data)} bytes that do not match the announced "
                                  f"{header.total_bytes} bytes / SHA-256")
    if header.kind == cpb.DownloadModelResponse.FULL and header.payload_sha256 != header.model.sha256:
        raise ModelIntegrityError("full model bytes do not hash to the announced model version")
    return DownloadedModel(header.kind, header.model, header.base_version, data)


class CoordinatorClient:
    """Blocking client; one channel per instance."""

    def __init__(self, target: str, token: str, tls: TLSConfig | None = None, timeout: float = 60.0):
        self.target, self.timeout = target, timeout
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.channel = (grpc.secure_channel(target, tls.credentials(), _options(tls)) if tls
                        else grpc.insecure_channel(target, _options(None)))
        self.stub = cpb_grpc.CoordinatorServiceStub(self.channel)

    def _kw(self, timeout=None):
        return dict(metadata=self._metadata, timeout=timeout or self.timeout)

    def join(self, caps: pb.ClientCapabilities | None = None, **kwargs) -> cpb.JoinResponse:
        return self.stub.Join(cpb.JoinRequest(capabilities=caps or capabilities(**kwargs)), **self._kw())

    def get_task(self) -> cpb.GetTaskResponse:
        return self.stub.GetTask(cpb.GetTaskRequest(), **self._kw())

    def download(self, since_version: int | None = None) -> DownloadedModel:
        req = cpb.DownloadModelRequest() if since_version is None else cpb.DownloadModelRequest(since_version=since_version)
        header, parts = None, []
        for msg in self.stub.DownloadModel(req, **self._kw()):
            if msg.HasField("header"):
                header = msg.header
            parts.append(msg.data)
        return _assemble(header, parts)

    def submit(self, update: pb.ModelUpdate | bytes, round_id: int, model_version: int,
               chunk_bytes: int = CHUNK_BYTES) -> cpb.SubmitUpdateResponse:
        payload = update if isinstance(update, bytes) else update.SerializeToString()
        return self.stub.SubmitUpdate(submit_requests(payload, round_id, model_version, chunk_bytes), **self._kw())

    def heartbeat(self, round_id: int = 0, state: str = "") -> cpb.HeartbeatResponse:
        return self.stub.Heartbeat(cpb.HeartbeatRequest(round_id=round_id, state=state), **self._kw())

    def leave(self, reason: str = "") -> cpb.LeaveResponse:
        return self.stub.Leave(cpb.LeaveRequest(reason=reason), **self._kw())

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout).status

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncCoordinatorClient:
    """grpc.aio client with the same methods as :class:`CoordinatorClient` (awaitable)."""

    def __init__(self, target: str, token: str, tls: TLSConfig | None = None, timeout: float = 60.0,
                 channel: grpc.aio.Channel | None = None):
        self.target, self.timeout = target, timeout
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._own_channel = channel is None
        self.channel = channel or (grpc.aio.secure_channel(target, tls.credentials(), _options(tls)) if tls
                                   else grpc.aio.insecure_channel(target, _options(None)))
        self.stub = cpb_grpc.CoordinatorServiceStub(self.channel)

    def _kw(self):
        return dict(metadata=self._metadata, timeout=self.timeout)

    async def join(self, caps: pb.ClientCapabilities | None = None, **kwargs) -> cpb.JoinResponse:
        return await self.stub.Join(cpb.JoinRequest(capabilities=caps or capabilities(**kwargs)), **self._kw())

    async def get_task(self) -> cpb.GetTaskResponse:
        return await self.stub.GetTask(cpb.GetTaskRequest(), **self._kw())

    async def download(self, since_version: int | None = None) -> DownloadedModel:
        req = cpb.DownloadModelRequest() if since_version is None else cpb.DownloadModelRequest(since_version=since_version)
        header, parts = None, []
        async for msg in self.stub.DownloadModel(req, **self._kw()):
            if msg.HasField("header"):
                header = msg.header
            parts.append(msg.data)
        return _assemble(header, parts)

    async def submit(self, update: pb.ModelUpdate | bytes, round_id: int, model_version: int,
                     chunk_bytes: int = CHUNK_BYTES) -> cpb.SubmitUpdateResponse:
        payload = update if isinstance(update, bytes) else update.SerializeToString()
        return await self.stub.SubmitUpdate(submit_requests(payload, round_id, model_version, chunk_bytes), **self._kw())

    async def heartbeat(self, round_id: int = 0, state: str = "") -> cpb.HeartbeatResponse:
        return await self.stub.Heartbeat(cpb.HeartbeatRequest(round_id=round_id, state=state), **self._kw())

    async def leave(self, reason: str = "") -> cpb.LeaveResponse:
        return await self.stub.Leave(cpb.LeaveRequest(reason=reason), **self._kw())

    async def close(self) -> None:
        if self._own_channel:
            await self.channel.close()
