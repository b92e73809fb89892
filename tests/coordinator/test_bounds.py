"""Unit tests of the upload bounds (coordinator/bounds.py): the shared memory budget, the
per-client gate, bounded reads and weights."""

import asyncio
import time

import pytest

from fedmla.coordinator.bounds import UploadGate, bounded_weights, next_chunk
from fedmla.coordinator.errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted


def test_memory_budget_is_shared_and_waits_are_bounded():
    async def run():
        gate = UploadGate(slots=4, budget_bytes=100)
        with pytest.raises(ResourceExhausted, match="upload_memory_budget_bytes"):
            async with gate.memory(101, 1.0, None, None):
                pass
        async with gate.memory(60, 1.0, None, None):
            assert gate.reserved == 60
            with pytest.raises(DeadlineExceeded, match="no upload memory free"):
                async with gate.memory(50, 0.2, None, None):
                    pass
            with pytest.raises(FailedPrecondition, match="deadline"):       # the round's deadline comes first
                async with gate.memory(50, 30.0, time.time() + 0.2, 7):
                    pass
            async with gate.memory(40, 0.2, None, None):
                assert gate.reserved == 100
        assert gate.reserved == 0

        async def later_release():
            async with gate.memory(100, 1.0, None, None):
                await asyncio.sleep(0.1)
        task = asyncio.create_task(later_release())
        await asyncio.sleep(0.01)
        async with gate.memory(100, 5.0, None, None):     # waits for the first to finish
            assert task.done()
    asyncio.run(run())


def test_one_upload_per_client_and_bounded_reads():
    gate = UploadGate(slots=1, budget_bytes=1 << 20)
    with gate.client("a"):
        with pytest.raises(ResourceExhausted, match="in flight"):
            with gate.client("a"):
                pass
        with gate.client("b"):
            pass
    with gate.client("a"):
        pass

    async def silent():
        await asyncio.sleep(60)
        yield b""

    async def run():
        with pytest.raises(DeadlineExceeded, match="no chunk for 0.2s"):
            await next_chunk(silent().__aiter__(), 0.2)
        with pytest.raises(FailedPrecondition, match="round 3 reached its deadline"):
            await next_chunk(silent().__aiter__(), 30.0, time.time() + 0.2, 3)
        with pytest.raises(FailedPrecondition, match="deadline"):
            await next_chunk(silent().__aiter__(), 30.0, time.time() - 1, 3)

        async def two():
            yield 1
            yield 2
        it = two().__aiter__()
        assert [await next_chunk(it, 1.0), await next_chunk(it, 1.0), await next_chunk(it, 1.0)] == [1, 2, None]
    asyncio.run(run())


def test_weights_bounded_by_the_median():
    assert bounded_weights({}, 10) == {}
    assert bounded_weights({"a": 3}, 10) == {"a": 3}
    assert bounded_weights({"a": 1, "b": 1, "c": 2 ** 62}, 10) == {"a": 1, "b": 1, "c": 10}


def test_ingest_threads_one_per_core_at_most_one_per_slot(monkeypatch):
    from fedmla.coordinator.ingest import UploadIngest
    monkeypatch.delenv("FEDMLA_INGEST_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert UploadIngest.threads(8) == 2 and UploadIngest.threads(1) == 1
    monkeypatch.setenv("FEDMLA_INGEST_THREADS", "3")
    assert UploadIngest.threads(8) == 3
