"""BackgroundCoordinator: start and stop from a thread whose event loop asyncio.run closed."""

import asyncio

from fedmla.coordinator.inprocess import BackgroundCoordinator
from fedmla.coordinator.testing import settings_for


def test_background_coordinator_starts_after_asyncio_run_in_the_same_thread(tmp_path):
    async def nothing():
        return 1
    asyncio.run(nothing())          # leaves this thread without a current event loop
    for i in range(2):               # and gRPC's aio layer is set up and torn down twice
        with BackgroundCoordinator(settings_for(tmp_path / f"run{i}")) as bg:
            assert bg.port > 0
            assert bg.call(lambda: bg.coord.version) == 0
