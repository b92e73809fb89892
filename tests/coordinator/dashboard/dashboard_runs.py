"""A small, fully known federated run, and writers that record it the way a coordinator would.

Three clients, tiny model. Round 1: everyone replies. Round 2: client-c drops out.
Round 3: client-b's update is rejected (stale round id). Every number is chosen so a
test can check the dashboard against values computed by hand here.

Two writers record the same steps: :class:`MemoryWriter` into an
:class:`InMemorySource` (what a live coordinator feeds), :class:`SqliteWriter` into a
store with :data:`STORE_SCHEMA` (what the coordinator commits per round).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.dashboard.source import (ClientRecord, ClientRoundRecord, HeadImportanceRecord, InMemorySource,
                                          RoundRecord, RunRecord)
from coordinator.dashboard.sqlite_source import STORE_SCHEMA, SqliteSource

RUN_ID = "run-0001"
CLIENTS = ("client-a", "client-b", "client-c")
T0 = 1_760_000_000.0                        # unix time the run started (unit tests; live tests pass their own)
MODEL_FP32_BYTES = 97_728 * 4               # tiny preset: 97,728 parameters
CONFIG = {"model": {"preset": "tiny"}, "rounds": 3, "clients_per_round": 3, "rank": 4, "quant": "int8",
          "local_steps": 20, "seed": 7}

TRAIN_LOSS = {1: 3.2, 2: 2.9, 3: 2.7}
VAL_LOSS = {1: 3.3, 2: 3.0, 3: 2.75}
UP_PER_CLIENT = 2_500                       # bytes each replying client sends
DOWN_PER_CLIENT = 6_000                     # bytes sent to each sampled client
REPLIED = {1: ("client-a", "client-b", "client-c"), 2: ("client-a", "client-b"), 3: ("client-a", "client-c")}
DROPPED = {1: (), 2: ("client-c",), 3: ()}
REJECTED = {1: (), 2: (), 3: ("client-b",)}
REJECTION = "stale update: answered round 2 during round 3"
SCORES = {
    1: [[0.40, 0.30, 0.20, 0.10], [0.28, 0.26, 0.24, 0.22]],
    2: [[0.45, 0.30, 0.15, 0.10], [0.10, 0.40, 0.30, 0.20]],
    3: [[0.50, 0.30, 0.12, 0.08], [0.05, 0.45, 0.35, 0.15]],
}
# top-3 heads per layer are active
MASK = {r: [[s >= sorted(row)[1] for s in row] for row in SCORES[r]] for r in SCORES}


@dataclass
class Step:
    """What the coordinator records at one point of the run."""

    round: RoundRecord
    client_rounds: list[ClientRoundRecord] = field(default_factory=list)
    clients: list[ClientRecord] = field(default_factory=list)
    importance: HeadImportanceRecord | None = None


def round_start(i: int, t0: float = T0) -> Step:
    return Step(RoundRecord(id=i, status="running", started_at=t0 + 10 * i, sampled=len(CLIENTS)),
                clients=[ClientRecord(name=c, status="training", last_seen=t0 + 10 * i, rounds_joined=i - 1,
                                      bytes_up=_client_up(c, i - 1), bytes_down=DOWN_PER_CLIENT * (i - 1))
                         for c in CLIENTS])


def round_end(i: int, t0: float = T0) -> Step:
    replied, dropped, rejected = REPLIED[i], DROPPED[i], REJECTED[i]
    arrived = replied + rejected                     # a rejected update still came over the wire
    rows = [ClientRoundRecord(round_id=i, client=c, bytes_up=UP_PER_CLIENT if c in arrived else 0,
                              bytes_down=DOWN_PER_CLIENT, local_loss=None if c in dropped else TRAIN_LOSS[i] + 0.01 * k,
                              num_examples=None if c in dropped else 1000 + 100 * k,
                              rejection_reason=REJECTION if c in rejected else None)
            for k, c in enumerate(CLIENTS)]
    status = {c: "dropped" if c in dropped else "rejected" if c in rejected else "idle" for c in CLIENTS}
    clients = [ClientRecord(name=c, status=status[c], last_seen=t0 + 10 * i + (9 if c not in dropped else 1),
                            rounds_joined=i, bytes_up=_client_up(c, i), bytes_down=DOWN_PER_CLIENT * i)
               for c in CLIENTS]
    rec = RoundRecord(
        id=i, status="completed", started_at=t0 + 10 * i, ended_at=t0 + 10 * i + 8.5,
        sampled=len(CLIENTS), replied=len(replied), dropped=len(dropped), rejected=len(rejected),
        train_loss=TRAIN_LOSS[i], val_loss=VAL_LOSS[i],
        bytes_up=UP_PER_CLIENT * len(arrived), bytes_down=DOWN_PER_CLIENT * len(CLIENTS),
        fedavg_fp32_bytes=MODEL_FP32_BYTES * (len(CLIENTS) + len(replied)),
        aggregation_seconds=0.25 * i,
        reason="fewer replies than sampled" if dropped or rejected else None,
    )
    return Step(rec, rows, clients, HeadImportanceRecord(round_id=i, scores=SCORES[i], mask=MASK[i]))


def _client_up(c: str, through_round: int) -> int:
    return sum(UP_PER_CLIENT for r in range(1, through_round + 1) if c in REPLIED[r] + REJECTED[r])


def steps(n_rounds: int = 3, t0: float = T0) -> list[Step]:
    """Round 1 started, round 1 ended, round 2 started, ... with times counted from ``t0``."""
    out = []
    for i in range(1, n_rounds + 1):
        out += [round_start(i, t0), round_end(i, t0)]
    return out


class MemoryWriter:
    def __init__(self, source: InMemorySource | None = None) -> None:
        self.source = source or InMemorySource(RUN_ID, config=CONFIG, schema_version=1, created_at=T0)

    def write(self, step: Step) -> None:
        s = self.source
        for c in step.clients:
            s.put_client(c)
        for row in step.client_rounds:
            s.put_client_round(row)
        if step.importance is not None:
            s.put_head_importance(step.importance)
        s.put_round(step.round)  # last, as a coordinator would announce the round's end

    def close(self) -> None:
        pass


class SqliteWriter:
    """Writes the run into a store the way the coordinator commits it: one transaction per step."""

    def __init__(self, path: Path, schema_version: int = 1, wal: bool = True) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if wal:
            self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.executescript(STORE_SCHEMA)
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                                  [("schema_version", str(schema_version)), ("run_id", RUN_ID), ("created_at", str(T0))])
            self.conn.execute("INSERT INTO run_config (id, config_json) VALUES (1, ?)", (json.dumps(CONFIG),))

    def write(self, step: Step) -> None:
        r = step.round
        with self.conn:
            self.conn.execute("BEGIN")
            for c in step.clients:
                self.conn.execute("INSERT OR REPLACE INTO clients VALUES (?, ?, ?, ?, ?, ?)",
                                  (c.name, c.status, c.last_seen, c.rounds_joined, c.bytes_up, c.bytes_down))
            self.conn.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.id, r.status, r.started_at, r.ended_at, r.sampled, r.replied, r.dropped, r.rejected, r.train_loss,
                 r.val_loss, r.bytes_up, r.bytes_down, r.fedavg_fp32_bytes, r.aggregation_seconds, r.reason))
            for row in step.client_rounds:
                self.conn.execute("INSERT OR REPLACE INTO client_rounds VALUES (?, ?, ?, ?, ?, ?, ?)",
                                  (row.round_id, row.client, row.bytes_up, row.bytes_down, row.local_loss,
                                   row.num_examples, row.rejection_reason))
            if step.importance is not None:
                imp = step.importance
                self.conn.execute("INSERT OR REPLACE INTO head_importance VALUES (?, ?, ?)",
                                  (imp.round_id, json.dumps(imp.scores), json.dumps(imp.mask) if imp.mask else None))

    def close(self) -> None:
        self.conn.close()


def run_record() -> RunRecord:
    return RunRecord(run_id=RUN_ID, schema_version=1, created_at=T0, config=CONFIG)


def make_source(kind: str, directory: Path, n_rounds: int = 3):
    """A source holding the example run's first ``n_rounds`` rounds; returns (source, writer)."""
    if kind == "memory":
        writer = MemoryWriter()
        source = writer.source
    else:
        writer = SqliteWriter(directory / "run.sqlite")
        source = None
    for step in steps(n_rounds):
        writer.write(step)
    if source is None:
        source = SqliteSource(writer.path)
    return source, writer
