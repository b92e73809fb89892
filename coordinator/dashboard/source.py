"""What the dashboard reads: the records of a run, and the interface to read them.

A :class:`DashboardSource` is anything that can answer a handful of read-only
questions about one federated run (its config, its rounds, its clients, the head
importance of a round) and report a change counter so that the web page can be
pushed an update when something changed. Two implementations exist:

- :class:`InMemorySource` here, which a live coordinator feeds directly (and which
  unit tests use), and
- :class:`~coordinator.dashboard.sqlite_source.SqliteSource`, which reads a
  coordinator's SQLite store read-only, so that history survives a restart and a
  finished run can be inspected with no coordinator running.

The records are the raw facts as the coordinator stores them. Everything computed
from them (perplexity, durations, cumulative bytes, the ratio against FedAvg) lives
in :mod:`fedmla.coordinator.dashboard.views`, in pure functions, so the JSON API and the
page show the same numbers whichever source they come from.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class RunRecord(BaseModel):
    """Identity and configuration of one run."""

    model_config = _FROZEN

    run_id: str = Field(description="identifier of the run, stable across coordinator restarts")
    schema_version: int | None = Field(None, description="version of the store schema the run was written with")
    created_at: float | None = Field(None, description="unix time the run was created")
    config: dict[str, Any] = Field(default_factory=dict, description="the run configuration (coordinator settings) as recorded")
    mla_config: dict[str, Any] | None = Field(None, description="the MLAConfig of the run's model (its fields), as recorded")
    privacy: dict[str, Any] | None = Field(None, description=(
        "client-level differential privacy, when the run uses it: epsilon spent at delta, target_epsilon, "
        "rounds accounted, noise_multiplier, clip_norm, exhausted (the coordinator refused further rounds)"))


class RoundRecord(BaseModel):
    """One federated round as the coordinator recorded it.

    ``fedavg_fp32_bytes`` is what the replying clients would have sent up with plain
    FedAvg in fp32 (one dense fp32 update each), to compare against ``bytes_up``.
    A round is *open* while ``ended_at`` is unset; once ended it no longer changes.
    """

    model_config = _FROZEN

    id: int = Field(ge=0)
    status: str = Field(description="committed or failed once ended (the coordinator's words); e.g. running while open")
    started_at: float | None = Field(None, description="unix time")
    ended_at: float | None = Field(None, description="unix time; unset while the round runs")
    sampled: int = Field(0, ge=0)
    replied: int = Field(0, ge=0)
    dropped: int = Field(0, ge=0)
    rejected: int = Field(0, ge=0)
    train_loss: float | None = Field(None, description="mean local training loss of the replies, nats/token")
    val_loss: float | None = Field(None, description="global model loss on the held-out set, nats/token")
    bytes_up: int = Field(0, ge=0, description="serialized bytes received from clients")
    bytes_down: int = Field(0, ge=0, description="serialized bytes sent to clients")
    fedavg_fp32_bytes: int | None = Field(None, ge=0, description="bytes the replying clients would have sent up with FedAvg in fp32")
    aggregation_seconds: float | None = Field(None, ge=0)
    reason: str | None = Field(None, description="why the round ended the way it did (e.g. deadline, too few replies)")
    model_version: int | None = Field(None, description="global model version after the round")


class ClientRecord(BaseModel):
    """A client as the coordinator last saw it."""

    model_config = _FROZEN

    name: str
    status: str = Field(description="joined, left or inactive (the coordinator's words)")
    joined_at: float | None = Field(None, description="unix time the client first joined")
    last_seen: float | None = Field(None, description="unix time of the client's last message")
    rounds_joined: int = Field(0, ge=0)
    bytes_up: int = Field(0, ge=0, description="total serialized bytes received from this client")
    bytes_down: int = Field(0, ge=0, description="total serialized bytes sent to this client")


class ClientRoundRecord(BaseModel):
    """One client's part in one round."""

    model_config = _FROZEN

    round_id: int = Field(ge=0)
    client: str
    status: str | None = Field(None, description="replied, dropped or rejected")
    bytes_up: int = Field(0, ge=0)
    bytes_down: int = Field(0, ge=0)
    local_loss: float | None = None
    num_examples: int | None = Field(None, ge=0)
    rejection_reason: str | None = Field(None, description="set when the coordinator rejected this client's update")


class HeadImportanceRecord(BaseModel):
    """Global head importance after a round.

    ``scores[l][h]`` is the importance of head h of layer l; rows may be shorter than
    ``n_heads`` after pruning. ``mask[l][h]`` is True for heads that were active
    (trained and sent) in this round; ``None`` when the coordinator did not record it.
    """

    model_config = _FROZEN

    round_id: int = Field(ge=0)
    scores: list[list[float]]
    mask: list[list[bool]] | None = None


@runtime_checkable
class DashboardSource(Protocol):
    """Read-only view of one run. Implementations must be safe to call from several threads."""

    def version(self) -> int:
        """A counter that changes whenever anything below may have changed."""

    def run(self) -> RunRecord: ...

    def rounds(self) -> list[RoundRecord]:
        """All rounds, by increasing id."""

    def clients(self) -> list[ClientRecord]:
        """All clients, by name."""

    def client_rounds(self, round_id: int | None = None, client: str | None = None) -> list[ClientRoundRecord]:
        """Client-round rows, optionally for one round and/or one client, by (round, client)."""

    def latest_client_rounds(self) -> list[ClientRoundRecord]:
        """Each client's row for the latest round it took part in."""

    def head_importance_rounds(self) -> list[int]:
        """Rounds for which head importance was recorded, increasing."""

    def head_importance(self, round_id: int) -> HeadImportanceRecord | None: ...

    def close(self) -> None: ...


class InMemorySource:
    """A :class:`DashboardSource` held in memory and fed by a live coordinator.

    The coordinator calls the ``put_*`` methods as a round progresses (each replaces
    the record with the same key); the dashboard reads concurrently. Records are
    immutable, so readers get consistent snapshots without copying.
    """

    def __init__(self, run_id: str = "live", config: dict[str, Any] | None = None, mla_config: dict[str, Any] | None = None,
                 schema_version: int | None = None, created_at: float | None = None) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self._run = RunRecord(run_id=run_id, config=config or {}, mla_config=mla_config, schema_version=schema_version,
                              created_at=created_at)
        self._rounds: dict[int, RoundRecord] = {}
        self._clients: dict[str, ClientRecord] = {}
        self._client_rounds: dict[tuple[int, str], ClientRoundRecord] = {}
        self._importance: dict[int, HeadImportanceRecord] = {}

    # ---- feeding (called by the coordinator) ---------------------------------------
    def set_run(self, run: RunRecord) -> None:
        with self._lock:
            self._run = run
            self._version += 1

    def put_round(self, record: RoundRecord) -> None:
        with self._lock:
            self._rounds[record.id] = record
            self._version += 1

    def put_client(self, record: ClientRecord) -> None:
        with self._lock:
            self._clients[record.name] = record
            self._version += 1

    def put_client_round(self, record: ClientRoundRecord) -> None:
        with self._lock:
            self._client_rounds[(record.round_id, record.client)] = record
            self._version += 1

    def put_head_importance(self, record: HeadImportanceRecord) -> None:
        with self._lock:
            self._importance[record.round_id] = record
            self._version += 1

    def discard_round(self, round_id: int) -> None:
        """Forget a round and its client rows (e.g. once the store has committed it)."""
        with self._lock:
            self._rounds.pop(round_id, None)
            for key in [k for k in self._client_rounds if k[0] == round_id]:
                del self._client_rounds[key]
            self._version += 1

    # ---- DashboardSource ------------------------------------------------------------
    def version(self) -> int:
        with self._lock:
            return self._version

    def run(self) -> RunRecord:
        with self._lock:
            return self._run

    def rounds(self) -> list[RoundRecord]:
        with self._lock:
            return [self._rounds[k] for k in sorted(self._rounds)]

    def clients(self) -> list[ClientRecord]:
        with self._lock:
            return [self._clients[k] for k in sorted(self._clients)]

    def client_rounds(self, round_id: int | None = None, client: str | None = None) -> list[ClientRoundRecord]:
        with self._lock:
            rows = [r for k, r in sorted(self._client_rounds.items())
                    if (round_id is None or k[0] == round_id) and (client is None or k[1] == client)]
        return rows

    def latest_client_rounds(self) -> list[ClientRoundRecord]:
        latest: dict[str, ClientRoundRecord] = {}
        with self._lock:
            for (rid, name), row in sorted(self._client_rounds.items()):
                latest[name] = row  # sorted by round, so the last one wins
        return [latest[k] for k in sorted(latest)]

    def head_importance_rounds(self) -> list[int]:
        with self._lock:
            return sorted(self._importance)

    def head_importance(self, round_id: int) -> HeadImportanceRecord | None:
        with self._lock:
            return self._importance.get(round_id)

    def close(self) -> None:
        pass


class OverlaySource:
    """A store's history with a live overlay: what a coordinator serving its own store uses.

    The store (usually a :class:`~coordinator.dashboard.sqlite_source.SqliteSource`)
    only learns of a round when it commits; the coordinator puts the round in progress
    (and its clients' rows and freshest client states) into ``live``, an
    :class:`InMemorySource`, as it happens. What the store has wins: an overlay round
    is shown only until the store commits a round with its id.
    """

    def __init__(self, store: DashboardSource, live: InMemorySource | None = None) -> None:
        self.store = store
        self.live = live if live is not None else InMemorySource()
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._version = 0

    def version(self) -> int:
        both = (self.store.version(), self.live.version())
        with self._lock:
            if both != self._seen:
                self._seen = both
                self._version += 1
            return self._version

    def run(self) -> RunRecord:
        return self.store.run()

    def rounds(self) -> list[RoundRecord]:
        stored = self.store.rounds()
        ids = {r.id for r in stored}
        return sorted(stored + [r for r in self.live.rounds() if r.id not in ids], key=lambda r: r.id)

    def clients(self) -> list[ClientRecord]:
        merged = {c.name: c for c in self.store.clients()}
        for c in self.live.clients():
            old = merged.get(c.name)
            if old is None or (c.last_seen or 0) >= (old.last_seen or 0):
                merged[c.name] = c
        return [merged[k] for k in sorted(merged)]

    def client_rounds(self, round_id: int | None = None, client: str | None = None) -> list[ClientRoundRecord]:
        stored = self.store.client_rounds(round_id, client)
        committed = {r.id for r in self.store.rounds()}
        extra = [r for r in self.live.client_rounds(round_id, client) if r.round_id not in committed]
        return sorted(stored + extra, key=lambda r: (r.round_id, r.client))

    def latest_client_rounds(self) -> list[ClientRoundRecord]:
        latest = {r.client: r for r in self.store.latest_client_rounds()}
        committed = {r.id for r in self.store.rounds()}
        for r in self.live.latest_client_rounds():
            if r.round_id not in committed and (r.client not in latest or r.round_id > latest[r.client].round_id):
                latest[r.client] = r
        return [latest[k] for k in sorted(latest)]

    def head_importance_rounds(self) -> list[int]:
        return sorted(set(self.store.head_importance_rounds()) | set(self.live.head_importance_rounds()))

    def head_importance(self, round_id: int) -> HeadImportanceRecord | None:
        rec = self.store.head_importance(round_id)
        return rec if rec is not None else self.live.head_importance(round_id)

    def close(self) -> None:
        self.store.close()
