"""Upload ingestion: one client's update stream, read, checked against the open round,
decoded against the round's codec plan and spooled to disk.

Refusals raise a :class:`~fedmla.coordinator.errors.CoordinatorError` and change
nothing. At most ``max_concurrent_uploads`` streams are read at once, so memory does not
grow with the number of clients submitting together; accepted updates wait in
``STORE/spool/round-N/`` until the round closes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from fedmla.protos.codec import DecodedUpdate, UpdateDecodeError
from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.weights import sha256_hex

from .errors import AlreadyExists, CoordinatorError, FailedPrecondition, InvalidArgument, ResourceExhausted

if TYPE_CHECKING:
    from .rounds import Coordinator, OpenRound


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
        self._slots = asyncio.Semaphore(coord.settings.max_concurrent_uploads)

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

    def decode(self, msg: pb.ModelUpdate, rnd: "OpenRound") -> DecodedUpdate:
        """Validate one update against the round's codec plan (on a worker thread)."""
        try:
            return self.coord.codec.decode(msg, rnd.plan)
        except UpdateDecodeError as e:
            raise InvalidArgument(f"update does not fit round {rnd.id}'s codec plan: {e}", "invalid_update") from None

    async def submit(self, client: str, requests: AsyncIterator) -> cpb.SubmitUpdateResponse:
        """Receive, validate and spool one update from a stream of ``SubmitUpdateRequest``
        (header on the first). Refuses with a CoordinatorError and changes nothing."""
        coord = self.coord
        started = time.perf_counter()
        try:
            coord.registry.known(client)
            async with self._slots:
                it = requests.__aiter__()
                try:
                    first = await it.__anext__()
                except StopAsyncIteration:
                    first = None
                if first is None or not first.HasField("header"):
                    raise InvalidArgument("the first SubmitUpdate chunk must carry the header (round, version, "
                                          "size, sha256)", "malformed")
                header = first.header
                rnd = self.check_round(client, header.round_id, header.model_version)
                limit = self.settings.max_update_bytes
                if header.total_bytes <= 0:
                    raise InvalidArgument(f"header.total_bytes must be positive, got {header.total_bytes}", "malformed")
                if header.total_bytes > limit:
                    raise ResourceExhausted(f"update of {header.total_bytes} bytes exceeds this round's limit of "
                                            f"{limit} bytes (max_update_bytes)", "size")
                if client in rnd.receiving:
                    raise AlreadyExists(f"an update from {client!r} for round {rnd.id} is already being received",
                                        "replay")
                rnd.receiving.add(client)
                try:
                    payload = await self.read_payload(header, first, it)
                    msg = pb.ModelUpdate()
                    try:
                        msg.ParseFromString(payload)
                    except DecodeError:
                        raise InvalidArgument("payload is not a serialized fedmla.v1.ModelUpdate", "malformed") from None
                    update = await asyncio.to_thread(self.decode, msg, rnd)
                    del msg
                    if coord.round is not rnd or rnd.closing:
                        raise FailedPrecondition(f"round {rnd.id} closed while the update was being received",
                                                 "round_closed")
                    path = coord.spool_root / f"round-{rnd.id:06d}" / f"{client}.pb"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    await asyncio.to_thread(path.write_bytes, payload)
                    # Summed into the round's aggregate now (exactly, in any order), so the
                    # close has little left to do; the decoded update is dropped after.
                    try:
                        await asyncio.to_thread(rnd.aggregator.add, client, update, update.num_examples)
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

    async def read_payload(self, header, first, rest: AsyncIterator) -> bytes:
        buf = bytearray(first.data)
        if len(buf) > header.total_bytes:
            raise ResourceExhausted(f"received more than the {header.total_bytes} bytes the header announced", "size")
        async for msg in rest:
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
