"""Upload ingestion: one client's update stream, read, checked against the open round,
decoded against the round's codec plan and spooled to disk.

Refusals raise a :class:`~fedmla.coordinator.errors.CoordinatorError` and change
nothing; accepted updates wait in ``STORE/spool/round-N/`` until the round closes.

Bounded whatever a client does (issue 15, pieces in :mod:`fedmla.coordinator.bounds`):
one upload in flight per client; every read of a stream waits at most
``upload_idle_timeout_s`` and never past the round's deadline; an upload slot
(``max_concurrent_uploads``) is taken only once the header has arrived; an announced size
above the largest update the round's plan allows is refused unread; the memory an upload
may need is reserved from ``upload_memory_budget_bytes``, shared by all uploads in flight.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from fedmla.protos.codec import DecodedUpdate, UpdateDecodeError, blas
from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.weights import sha256_hex

from .bounds import UploadGate, next_chunk, upload_cost
from .errors import AlreadyExists, CoordinatorError, FailedPrecondition, InvalidArgument, ResourceExhausted

if TYPE_CHECKING:
    from .rounds import Coordinator, OpenRound


def one_blas_thread() -> bool:
    """Bound the calling thread's MKL calls (the low-rank products) to one thread, for this
    thread only; True when it took effect. By default each ingest thread opened a team of
    one OpenMP thread per core for every product: on 2 cores, 2 ingest threads ran 4 BLAS
    threads that waited on each other (bench at 100 clients: 23-24 against 28-36 ms of
    coordinator CPU per update). ``torch.set_num_threads`` cannot do this: called from one
    thread it sets torch's and MKL's counts for every thread of the process. The products
    keep their bits (tests/coordinator/test_ingest_threads.py); the exact sum bounds its
    products to one thread itself too (:mod:`fedmla.protos.codec.blas`)."""
    return blas.bound_calling_thread()


@dataclass
class Reply:
    path: Path
    bytes_up: int
    num_examples: int
    metrics: dict[str, float]


class UploadIngest:
    def __init__(self, coord: "Coordinator"):
        self.coord = coord
        self.settings = coord.settings
        self.gate = UploadGate(coord.settings.max_concurrent_uploads, self.memory_budget(coord))
        self.pool = ThreadPoolExecutor(self.threads(coord.settings.max_concurrent_uploads),
                                       thread_name_prefix="fedmla-ingest", initializer=one_blas_thread)

    @staticmethod
    def threads(slots: int) -> int:
        """Threads that decode and sum updates: one per core (``FEDMLA_INGEST_THREADS``
        overrides), at most one per upload slot. Decoding and summing release the GIL only
        in their numpy / torch / compiled calls: more threads than cores add no work done,
        only GIL hand-offs (measured: 6 threads ingested fewer updates/s than 1 or 2)."""
        n = int(os.environ.get("FEDMLA_INGEST_THREADS", "0")) or os.cpu_count() or 1
        return max(1, min(n, slots))

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def memory_budget(coord: "Coordinator") -> int:
        """``upload_memory_budget_bytes``, or by default room for two of the largest uploads
        the model allows (an fp32 update of every parameter), at least 256 MiB."""
        if coord.settings.upload_memory_budget_bytes:
            return coord.settings.upload_memory_budget_bytes
        n = coord.spec.num_elements()
        return max(256 << 20, 2 * upload_cost(4 * n + (1 << 20), n))

    def check_round(self, client: str, round_id: int, model_version: int) -> "OpenRound":
        rnd = self.coord.round
        if rnd is None or rnd.closing:
            now_id = rnd.id if rnd else self.coord.next_round_id
            raise FailedPrecondition(f"round {round_id} is not accepting updates (round {now_id} "
                                     f"{'is closing' if rnd else 'has not opened'}); call GetTask", "round_closed")
        if round_id != rnd.id:
            raise FailedPrecondition(f"update is for round {round_id} but the open round is {rnd.id}: late or "
                                     f"replayed updates are refused; call GetTask", "wrong_round")
        if model_version != rnd.base_version:
            raise FailedPrecondition(f"update was trained on model version {model_version} but round {rnd.id} "
                                     f"starts from version {rnd.base_version}; download the model again",
                                     "wrong_version")
        if client not in rnd.sampled:
            raise FailedPrecondition(f"client {client!r} was not sampled for round {rnd.id}", "not_sampled")
        if client in rnd.left:
            raise FailedPrecondition(f"client {client!r} left round {rnd.id}", "not_sampled")
        if client in rnd.replies:
            raise AlreadyExists(f"client {client!r} already submitted an update for round {rnd.id}", "replay")
        return rnd

    def limits(self, rnd: "OpenRound") -> tuple[int, int]:
        """(largest serialized update, float32 elements of a decoded update) a client can
        send in ``rnd``: from its codec plan, and never above ``max_update_bytes``."""
        if rnd.upload_limits is None:
            codec = self.coord.codec
            rnd.upload_limits = (min(self.settings.max_update_bytes, codec.max_update_bytes(rnd.plan)),
                                 codec.tensors.decoded_elements(rnd.plan))
        return rnd.upload_limits

    def decode(self, msg: pb.ModelUpdate, rnd: "OpenRound") -> DecodedUpdate:
        """Validate one update against the round's codec plan (on a worker thread)."""
        try:
            return self.coord.codec.decode(msg, rnd.plan)
        except UpdateDecodeError as e:
            raise InvalidArgument(f"update does not fit round {rnd.id}'s codec plan: {e}", "invalid_update") from None

    @staticmethod
    def spool_and_add(path: Path, payload: bytes, rnd: "OpenRound", client: str, update: DecodedUpdate) -> None:
        path.write_bytes(payload)
        rnd.aggregator.add(client, update, update.num_examples)

    async def submit(self, client: str, requests: AsyncIterator) -> cpb.SubmitUpdateResponse:
        """Receive, validate and spool one update from a stream of ``SubmitUpdateRequest``
        (header on the first). Refuses with a CoordinatorError and changes nothing."""
        coord = self.coord
        started = time.perf_counter()
        idle = self.settings.upload_idle_timeout_s
        try:
            coord.registry.known(client)
            with self.gate.client(client):                  # one upload in flight per client
                it = requests.__aiter__()
                now = coord.round
                first = await next_chunk(it, idle, now.deadline if now else None, now.id if now else None)
                if first is None or not first.HasField("header"):
                    raise InvalidArgument("the first SubmitUpdate chunk must carry the header (round, version, "
                                          "size, sha256)", "malformed")
                header = first.header
                rnd = self.check_round(client, header.round_id, header.model_version)
                limit, elements = self.limits(rnd)
                if header.total_bytes <= 0:
                    raise InvalidArgument(f"header.total_bytes must be positive, got {header.total_bytes}", "malformed")
                if header.total_bytes > limit:
                    raise ResourceExhausted(f"update of {header.total_bytes} bytes exceeds round {rnd.id}'s limit of "
                                            f"{limit} bytes (the largest update its plan allows, at most "
                                            f"max_update_bytes)", "size")
                if client in rnd.receiving:
                    raise AlreadyExists(f"an update from {client!r} for round {rnd.id} is already being received",
                                        "replay")
                rnd.receiving.add(client)
                try:
                    # A slot, then the memory this upload may need, both taken once data arrived.
                    async with self.gate.slot(idle, rnd.deadline, rnd.id), \
                            self.gate.memory(upload_cost(header.total_bytes, elements), idle, rnd.deadline, rnd.id):
                        payload = await self.read_payload(header, first, it, rnd)
                        msg = pb.ModelUpdate()
                        try:
                            msg.ParseFromString(payload)
                        except DecodeError:
                            raise InvalidArgument("payload is not a serialized fedmla.v1.ModelUpdate",
                                                  "malformed") from None
                        update = await self._run(self.decode, msg, rnd)
                        del msg
                    if coord.round is not rnd or rnd.closing:
                        raise FailedPrecondition(f"round {rnd.id} closed while the update was being received",
                                                 "round_closed")
                    path = coord.spool_root / f"round-{rnd.id:06d}" / f"{client}.pb"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    # Spooled, then summed into the round's aggregate now (exactly, in any
                    # order), so the close has little left to do; the decoded update is
                    # dropped after. One job on the pool: one queue wait, not two.
                    try:
                        await self._run(self.spool_and_add, path, payload, rnd, client, update)
                    except (OverflowError, ValueError) as e:
                        path.unlink(missing_ok=True)
                        raise InvalidArgument(f"update cannot be aggregated: {e}", "invalid_update") from None
                    num_examples, metrics = update.num_examples, update.metrics
                    del update
                finally:
                    rnd.receiving.discard(client)
                    coord.changed()
        except CoordinatorError as e:
            raise coord.reject(e, client) from None
        rnd.replies[client] = Reply(path, len(payload), num_examples, metrics)
        rnd.rejected.pop(client, None)
        coord.metrics.updates.inc()
        coord.metrics.bytes.labels("up").inc(len(payload))
        coord.metrics.submit_seconds.observe(time.perf_counter() - started)
        coord.changed()
        return cpb.SubmitUpdateResponse(round_id=rnd.id, bytes_received=len(payload), replies_in_round=len(rnd.replies))

    async def read_payload(self, header, first, rest: AsyncIterator, rnd: "OpenRound | None" = None) -> bytes:
        """The rest of the stream; each chunk awaited at most ``upload_idle_timeout_s`` and
        never past the round's deadline."""
        buf = bytearray(first.data)
        if len(buf) > header.total_bytes:
            raise ResourceExhausted(f"received more than the {header.total_bytes} bytes the header announced", "size")
        idle = self.settings.upload_idle_timeout_s
        deadline, rid = (rnd.deadline, rnd.id) if rnd is not None else (None, None)
        while (msg := await next_chunk(rest, idle, deadline, rid)) is not None:
            if msg.HasField("header"):
                raise InvalidArgument("only the first SubmitUpdate chunk may carry a header", "malformed")
            data = msg.data
            if len(buf) + len(data) > header.total_bytes:
                raise ResourceExhausted(f"received more than the {header.total_bytes} bytes the header announced",
                                        "size")
            buf += data
        if len(buf) != header.total_bytes:
            raise InvalidArgument(f"stream ended after {len(buf)} of {header.total_bytes} announced bytes", "truncated")
        if sha256_hex(bytes(buf)) != header.payload_sha256:
            raise InvalidArgument("payload SHA-256 does not match header.payload_sha256 (corrupted upload)", "malformed")
        return bytes(buf)
