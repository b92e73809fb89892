"""The coordinator's client registry: who joined, when each was last heard from, who left.

Clients of a previous incarnation of the coordinator (joined in the store) are given a
chance to come back: they start as active and drop out after ``client_timeout_s`` of
silence like anyone else.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.seeds import derive_seed

from .bounds import check_capabilities
from .errors import FailedPrecondition, InvalidArgument
from .metrics import CoordinatorMetrics
from .settings import CoordinatorSettings
from .store import Store


@dataclass
class ClientState:
    name: str
    status: str = "joined"           # joined | left
    last_seen: float = 0.0
    capabilities: dict = field(default_factory=dict)


class ClientRegistry:
    def __init__(self, store: Store, settings: CoordinatorSettings, metrics: CoordinatorMetrics,
                 on_change: Callable[[], None]):
        self.store, self.settings, self.metrics, self._on_change = store, settings, metrics, on_change
        self.clients: dict[str, ClientState] = {}
        now = time.time()
        for c in store.clients():
            if c["status"] == "joined":
                self.clients[c["name"]] = ClientState(c["name"], "joined", now, json.loads(c["capabilities"] or "{}"))
        self.update_gauges()

    def update_gauges(self) -> None:
        for status in ("joined", "left"):
            self.metrics.clients.labels(status).set(sum(1 for c in self.clients.values() if c.status == status))

    def join(self, client: str, caps: cpb.ClientCapabilities) -> ClientState:
        if caps.num_examples < 0 or caps.free_memory_bytes < 0:
            raise InvalidArgument("capabilities: num_examples and free_memory_bytes must be >= 0", "capabilities")
        check_capabilities(caps)          # stored and shown on the dashboard: bounded
        capabilities = dict(device=caps.device, free_memory_bytes=caps.free_memory_bytes,
                            num_examples=caps.num_examples, software_version=caps.software_version, extra=dict(caps.extra))
        now = time.time()
        state = self.clients[client] = ClientState(client, "joined", now, capabilities)
        self.store.upsert_client(client, "joined", capabilities, now)
        self.update_gauges()
        self._on_change()
        return state

    def known(self, client: str) -> ClientState:
        """The joined client (its last-seen time refreshed); FailedPrecondition otherwise."""
        c = self.clients.get(client)
        if c is None or c.status != "joined":
            raise FailedPrecondition(f"client {client!r} has not joined (or has left): call Join first", "not_joined")
        c.last_seen = time.time()
        return c

    def seen(self, client: str) -> ClientState | None:
        """The joined client with its last-seen time refreshed, or None (a heartbeat's view)."""
        c = self.clients.get(client)
        if c is None or c.status != "joined":
            return None
        c.last_seen = time.time()
        return c

    def leave(self, client: str) -> None:
        c = self.known(client)
        c.status = "left"
        self.store.set_client_status(client, "left", time.time())
        self.update_gauges()
        self._on_change()

    def is_active(self, client: str, now: float) -> bool:
        c = self.clients.get(client)
        return c is not None and c.status == "joined" and c.last_seen >= now - self.settings.client_timeout_s

    def active(self, now: float) -> list[str]:
        """Names of the joined clients heard from within ``client_timeout_s``, sorted."""
        return sorted(n for n in self.clients if self.is_active(n, now))

    def last_seen(self) -> dict[str, float]:
        return {n: c.last_seen for n, c in self.clients.items()}


def sample_round(seed: int, round_id: int, active: list[str], k: int) -> list[str]:
    """The clients round ``round_id`` samples: ``k`` of ``active`` (the registry's sorted
    list of active clients), drawn from a generator seeded by the run's seed and the round
    id alone, so the choice never depends on who joined first. ``fedmla simulate`` calls
    it too, to spread each round's sampled clients evenly over its client actors."""
    rng = random.Random(derive_seed(seed, "sample", round_id))
    return sorted(rng.sample(active, min(k, len(active))))
