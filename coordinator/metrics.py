"""Prometheus metrics of one coordinator (its own registry: no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rounds = Counter("fedmla_rounds", "Finished rounds by outcome", ["status"], registry=r)
        self.current_round = Gauge("fedmla_current_round", "Id of the open (or last) round", registry=r)
        self.model_version = Gauge("fedmla_model_version", "Version of the global model", registry=r)
        self.clients = Gauge("fedmla_clients", "Known clients by status", ["status"], registry=r)
        self.updates = Counter("fedmla_updates_accepted", "Updates accepted", registry=r)
        self.bytes = Counter("fedmla_bytes", "Payload bytes on the wire", ["direction"], registry=r)
        self.rejections = Counter("fedmla_rejections", "Refused calls and payloads by reason", ["reason"], registry=r)
        self.aggregation_seconds = Histogram("fedmla_aggregation_seconds", "Time to aggregate and commit a round",
                                             buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300), registry=r)
        self.submit_seconds = Histogram("fedmla_submit_seconds", "Time to receive and validate one update",
                                        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30), registry=r)
