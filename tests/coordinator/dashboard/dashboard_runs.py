"""A small, fully known federated run, and writers that record it the way the coordinator does.

Three clients, tiny model. Round 1: everyone replies. Round 2: client-c drops out.
Round 3: client-b's update is rejected (stale round id). Every number is chosen so a
test can check the dashboard against values computed by hand here. Vocabulary and
accounting follow coordinator/rounds.py: rounds end ``committed``; clients are
``joined``/``inactive``; a client-round is ``replied``/``dropped``/``rejected``; only
replies count bytes up and rounds joined; ``fedavg_fp32_bytes`` is replies x model fp32.

Two writers record the same steps: :class:`MemoryWriter` into an
:class:`InMemorySource` (what a live coordinator feeds, open rounds included), and
:class:`SqliteWriter` into a store directory with :data:`STORE_SCHEMA`, one transaction
per ended round as ``Store.commit_round`` does.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from fedmla.coordinator.dashboard.source import (ClientRecord, ClientRoundRecord, HeadImportanceRecord, InMemorySource,
                                          RoundRecord, RunRecord)
from fedmla.coordinator.dashboard.sqlite_source import APP, DB_NAME, STORE_SCHEMA, SqliteSource
from fedmla.mla_model.config import MLAConfig

RUN_ID = "3f9c1e0a5b7d4c2e8a6f0b1d2c3e4f5a"
CLIENTS = ("client-a", "client-b", "client-c")
T0 = 1_760_000_000.0                        # unix time the run started (unit tests; live tests pass their own)
MLA_CONFIG = MLAConfig.preset("tiny").model_dump()
MODEL_FP32_BYTES = 97_728 * 4               # tiny preset: 97,728 parameters
CONFIG = {"preset": "tiny", "rounds": 3, "clients_per_round": 3, "min_replies": 1,
          "codec": {"rank": 4, "factor_bits": 8, "keep_ratio": 0.75, "explore_heads": 0}, "local_steps": 20, "seed": 7}

TRAIN_LOSS = {1: 3.2, 2: 2.9, 3: 2.7}
VAL_LOSS = {1: 3.3, 2: 3.0, 3: 2.75}
UP_PER_CLIENT = {1: 2_500, 2: 3_000, 3: 2_000}  # bytes each replying client sends, by round
DOWN_PER_CLIENT = 6_000                     # bytes sent to each sampled client
REPLIED = {1: ("client-a", "client-b", "client-c"), 2: ("client-a", "client-b"), 3: ("client-a", "client-c")}
DROPPED = {1: (), 2: ("client-c",), 3: ()}
REJECTED = {1: (), 2: (), 3: ("client-b",)}
REASON = {1: "all sampled clients replied", 2: "remaining clients dropped", 3: "deadline"}
REJECTION = "FAILED_PRECONDITION: update for round 2 but round 3 is open"
SCORES = {
    1: [[0.40, 0.30, 0.20, 0.10], [0.28, 0.26, 0.24, 0.22]],
    2: [[0.45, 0.30, 0.15, 0.10], [0.10, 0.40, 0.30, 0.20]],
    3: [[0.50, 0.30, 0.12, 0.08], [0.05, 0.45, 0.35, 0.15]],
}
# active heads of each round: the top 3 of each layer
MASK = {r: [[s >= sorted(row)[1] for s in row] for row in SCORES[r]] for r in SCORES}


@dataclass
class Step:
    """What the coordinator records at one point of the run."""

    round: RoundRecord
    client_rounds: list[ClientRoundRecord] = field(default_factory=list)
    clients: list[ClientRecord] = field(default_factory=list)
    importance: HeadImportanceRecord | None = None


def _replied_rounds(c: str, through: int) -> int:
    return sum(1 for r in range(1, through + 1) if c in REPLIED[r])


def _client_up(c: str, through: int) -> int:
    return sum(UP_PER_CLIENT[r] for r in range(1, through + 1) if c in REPLIED[r])


def round_start(i: int, t0: float = T0) -> Step:
    return Step(RoundRecord(id=i, status="running", started_at=t0 + 10 * i, sampled=len(CLIENTS)),
                clients=[ClientRecord(name=c, status="joined", joined_at=t0, last_seen=t0 + 10 * i,
                                      rounds_joined=_replied_rounds(c, i - 1),
                                      bytes_up=_client_up(c, i - 1),
                                      bytes_down=DOWN_PER_CLIENT * (i - 1)) for c in CLIENTS])


def round_end(i: int, t0: float = T0) -> Step:
    replied, dropped, rejected = REPLIED[i], DROPPED[i], REJECTED[i]
    rows = []
    for k, c in enumerate(CLIENTS):
        status = "replied" if c in replied else "dropped" if c in dropped else "rejected"
        rows.append(ClientRoundRecord(
            round_id=i, client=c, status=status, bytes_up=UP_PER_CLIENT[i] if status == "replied" else 0,
            bytes_down=DOWN_PER_CLIENT, local_loss=TRAIN_LOSS[i] + 0.01 * k if status == "replied" else None,
            num_examples=1000 + 100 * k if status == "replied" else 0,
            rejection_reason=REJECTION if status == "rejected" else None))
    clients = [ClientRecord(name=c, status="inactive" if c in dropped else "joined", joined_at=t0,
                            last_seen=t0 + 10 * i + (9 if c not in dropped else 1),
                            rounds_joined=_replied_rounds(c, i), bytes_up=_client_up(c, i),
                            bytes_down=DOWN_PER_CLIENT * i) for c in CLIENTS]
    rec = RoundRecord(
        id=i, status="committed", started_at=t0 + 10 * i, ended_at=t0 + 10 * i + 8.5,
        sampled=len(CLIENTS), replied=len(replied), dropped=len(dropped), rejected=len(rejected),
        train_loss=TRAIN_LOSS[i], val_loss=VAL_LOSS[i],
        bytes_up=UP_PER_CLIENT[i] * len(replied), bytes_down=DOWN_PER_CLIENT * len(CLIENTS),
        fedavg_fp32_bytes=MODEL_FP32_BYTES * len(replied), aggregation_seconds=0.25 * i, reason=REASON[i],
        model_version=i,
    )
    return Step(rec, rows, clients, HeadImportanceRecord(round_id=i, scores=SCORES[i], mask=MASK[i]))


def steps(n_rounds: int = 3, t0: float = T0) -> list[Step]:
    """Round 1 started, round 1 ended, round 2 started, ... with times counted from ``t0``."""
    out = []
    for i in range(1, n_rounds + 1):
        out += [round_start(i, t0), round_end(i, t0)]
    return out


def run_record(with_mla_config: bool = True) -> RunRecord:
    return RunRecord(run_id=RUN_ID, schema_version=1, created_at=T0, config=CONFIG,
                     mla_config=MLA_CONFIG if with_mla_config else None)


class MemoryWriter:
    def __init__(self, source: InMemorySource | None = None) -> None:
        self.source = source or InMemorySource(RUN_ID, config=CONFIG, mla_config=MLA_CONFIG, schema_version=1,
                                               created_at=T0)

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
    """A store directory written the way coordinator/store.py writes it.

    Nothing of a round is written until it ends; then one transaction records the
    round, its client rows, client totals and head importance. ``mask_column`` adds
    the optional ``head_importance.mask`` column the dashboard reads when present.
    """

    def __init__(self, root: Path, schema_version: int = 1, mask_column: bool = False, app: str = APP) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / DB_NAME
        self.mask_column = mask_column
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        meta = [("app", app), ("schema_version", str(schema_version)), ("run_id", RUN_ID), ("created_at", repr(T0)),
                ("model_config", json.dumps(MLA_CONFIG)), ("run_config", json.dumps(CONFIG))]
        inserts = "".join(f"INSERT INTO meta(key, value) VALUES ('{k}', '{v}');" for k, v in meta)
        extra = "ALTER TABLE head_importance ADD COLUMN mask TEXT;" if mask_column else ""
        self.conn.executescript(f"BEGIN;{STORE_SCHEMA}{extra}{inserts}COMMIT;")

    def write(self, step: Step) -> None:
        r = step.round
        db = self.conn
        db.execute("BEGIN IMMEDIATE")
        for c in step.clients:
            db.execute("INSERT INTO clients(name, status, joined_at, last_seen, rounds_joined, bytes_up, bytes_down)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET status=excluded.status,"
                       " last_seen=excluded.last_seen, rounds_joined=excluded.rounds_joined,"
                       " bytes_up=excluded.bytes_up, bytes_down=excluded.bytes_down",
                       (c.name, c.status, c.joined_at, c.last_seen, c.rounds_joined, c.bytes_up, c.bytes_down))
        if r.ended_at is not None:
            db.execute("INSERT INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", (
                r.id, r.status, r.model_version, (r.model_version or 1) - 1, r.started_at, r.ended_at, r.sampled,
                r.replied, r.dropped, r.rejected, r.train_loss, r.val_loss, r.bytes_up, r.bytes_down,
                r.fedavg_fp32_bytes, r.aggregation_seconds, r.reason or ""))
            for row in step.client_rounds:
                db.execute("INSERT OR REPLACE INTO client_rounds VALUES (?,?,?,?,?,?,?,?,?)", (
                    row.round_id, row.client, row.status, row.bytes_up, row.bytes_down, row.local_loss,
                    row.num_examples, row.rejection_reason, json.dumps({"loss": row.local_loss})))
            imp = step.importance
            if imp is not None:
                L, H = len(imp.scores), len(imp.scores[0])
                if self.mask_column:
                    db.execute("INSERT INTO head_importance VALUES (?,?,?,?,?)",
                               (imp.round_id, L, H, json.dumps(imp.scores), json.dumps(imp.mask)))
                else:
                    db.execute("INSERT INTO head_importance VALUES (?,?,?,?)", (imp.round_id, L, H, json.dumps(imp.scores)))
        db.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


def make_source(kind: str, directory: Path, n_rounds: int = 3):
    """A source holding the example run's first ``n_rounds`` rounds; returns (source, writer).

    kind: ``memory``, ``sqlite`` (the coordinator's schema as is) or ``sqlite+mask``
    (with the optional mask column)."""
    if kind == "memory":
        writer = MemoryWriter()
        for step in steps(n_rounds):
            writer.write(step)
        return writer.source, writer
    writer = SqliteWriter(directory / "store", mask_column=kind == "sqlite+mask")
    for step in steps(n_rounds):
        writer.write(step)
    return SqliteSource(writer.root), writer
