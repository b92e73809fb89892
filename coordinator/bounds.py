"""Bounds on what one client can make the coordinator wait for or hold (issue 15).

The upload path (:mod:`fedmla.coordinator.ingest`) uses these pieces:

- :func:`next_chunk`: every read of an upload stream waits at most
  ``upload_idle_timeout_s`` and never past the round's deadline;
- :class:`UploadGate`: at most one upload in flight per client (checked before anything
  is read), an upload slot taken only once the first chunk has arrived, and a memory
  budget shared by all uploads in flight, reserved from the header before the payload is
  read; every wait bounded like a read;
- :func:`upload_cost`: what an upload may hold at most (payload, parsed message, decoded
  tensors of the round's plan);
- :func:`bounded_weights`: a client's weight in the mean at most
  ``max_weight_multiple`` x the median example count of the round's replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator

from .errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted


def round_closed(round_id: int) -> FailedPrecondition:
    return FailedPrecondition(f"round {round_id} reached its deadline while this update was being received; "
                              f"call GetTask", "deadline")


async def bounded(aw, idle_s: float, deadline: float | None, round_id: int | None, what: str):
    """Await ``aw`` for at most ``idle_s`` seconds and not past ``deadline`` (time.time())."""
    wait = idle_s
    if deadline is not None:
        left = deadline - time.time()
        if left <= 0:
            if asyncio.iscoroutine(aw):
                aw.close()
            raise round_closed(round_id)
        wait = min(wait, left)
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
    # arrives as the awaited read completes (a client killed mid-upload: gRPC cancels the
    # call as the stream ends), and the upload would be recorded as refused, not dropped.
    try:
        async with asyncio.timeout(wait):
            return await aw
    except TimeoutError:
        if deadline is not None and wait < idle_s:
            raise round_closed(round_id) from None
        raise DeadlineExceeded(f"{what} for {idle_s:g}s (upload_idle_timeout_s): upload ended", "idle") from None


async def next_chunk(it: AsyncIterator, idle_s: float, deadline: float | None = None, round_id: int | None = None):
    """The next request of an upload stream (None at its end), waiting at most ``idle_s``
    and never past the round's ``deadline``."""
    try:
        return await bounded(it.__anext__(), idle_s, deadline, round_id, "no chunk")
    except StopAsyncIteration:
        return None


def _queue_wait(idle_s: float, deadline: float | None) -> float:
    return float("inf") if deadline is not None else idle_s


def upload_cost(total_bytes: int, decoded_elements: int) -> int:
    """Bytes an upload may hold at once: the received payload and the parsed message
    (each at most ``total_bytes``) and the decoded float32 tensors of the plan."""
    return 2 * total_bytes + 4 * decoded_elements


class UploadGate:
    """Per-client and shared limits of the upload path (one per coordinator)."""

    def __init__(self, slots: int, budget_bytes: int):
        self.slots = asyncio.Semaphore(slots)
        self.budget_bytes = budget_bytes
        self.reserved = 0
        self.in_flight: set[str] = set()
        self._freed = asyncio.Condition()

    @contextlib.contextmanager
    def client(self, client: str):
        """At most one upload stream per client at a time, checked before anything is read."""
        if client in self.in_flight:
            raise ResourceExhausted(f"client {client!r} already has an upload in flight; one at a time", "in_flight")
        self.in_flight.add(client)
        try:
            yield
        finally:
            self.in_flight.discard(client)

    @contextlib.asynccontextmanager
    async def slot(self, idle_s: float, deadline: float | None, round_id: int | None):
        # Waiting for a slot is the coordinator being busy, not the client idling: bounded by
        # the round's deadline (by idle_s only when there is none), so that a burst of honest
        # uploads queues instead of being refused.
        await bounded(self.slots.acquire(), _queue_wait(idle_s, deadline), deadline, round_id, "no upload slot free")
        try:
            yield
        finally:
            self.slots.release()

    @contextlib.asynccontextmanager
    async def memory(self, nbytes: int, idle_s: float, deadline: float | None, round_id: int | None):
        """Reserve ``nbytes`` of the shared budget for the body of the block."""
        if nbytes > self.budget_bytes:
            raise ResourceExhausted(f"this upload may need {nbytes} bytes to receive and decode, more than the "
                                    f"upload memory budget of {self.budget_bytes} (upload_memory_budget_bytes)",
                                    "memory")

        async def wait():
            async with self._freed:
                await self._freed.wait_for(lambda: self.reserved + nbytes <= self.budget_bytes)
                self.reserved += nbytes
        await bounded(wait(), _queue_wait(idle_s, deadline), deadline, round_id, "no upload memory free")
        try:
            yield
        finally:
            self.reserved -= nbytes
            async with self._freed:
                self._freed.notify_all()


def bounded_weights(counts: dict[str, int], multiple: float) -> dict[str, int]:
    """Each client's weight in the mean: its example count, at most ``multiple`` x the
    median count of the round (at least 1)."""
    if not counts:
        return {}
    cap = max(1, int(multiple * statistics.median(counts.values())))
    return {c: min(n, cap) for c, n in counts.items()}


MAX_CAPABILITY_ENTRIES = 32      # ClientCapabilities.extra entries
MAX_CAPABILITY_CHARS = 256       # each capability string (device, version, extra keys and values)


def check_capabilities(caps) -> None:
    """A Join's capabilities are stored and shown on the dashboard: bounded in count and size."""
    from .errors import InvalidArgument
    from fedmla.protos.limits import clip
    if len(caps.extra) > MAX_CAPABILITY_ENTRIES:
        raise InvalidArgument(f"capabilities: {len(caps.extra)} extra entries; at most {MAX_CAPABILITY_ENTRIES}",
                              "capabilities")
    for what, text in [("device", caps.device), ("software_version", caps.software_version),
                       *((f"extra key {clip(k)}", k) for k in caps.extra), *((f"extra[{clip(k)}]", v)
                                                                          for k, v in caps.extra.items())]:
        if len(text) > MAX_CAPABILITY_CHARS:
            raise InvalidArgument(f"capabilities: {what} is {len(text)} characters; at most {MAX_CAPABILITY_CHARS}",
                                  "capabilities")
