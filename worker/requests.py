"""What the worker protocol (:class:`fedmla.worker.runtime.WorkerProtocol`) yields to its
driver: an RPC, a sleep, a CPU-heavy step, a download, the start of the heartbeat. The
blocking driver (:class:`fedmla.worker.runtime.Worker`) performs them with blocking
calls; the asyncio driver (:class:`fedmla.worker.virtual.AsyncWorker`) on an event loop,
heavy steps on a thread pool."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rpc:
    """Call ``name`` of the coordinator client (CoordinatorClient / AsyncCoordinatorClient)."""
    name: str
    args: tuple = ()
    kwargs: dict | None = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Compute:
    """CPU-heavy work (training, decoding, hashing, encoding): the async driver runs it off its loop."""
    fn: callable
    args: tuple = ()


@dataclass(frozen=True)
class Download:
    """A model download with retries (the drivers' ``_download``: a hook tests wrap)."""
    since: int | None


@dataclass(frozen=True)
class StartHeartbeat:
    interval: float
