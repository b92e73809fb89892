"""A :class:`~coordinator.dashboard.source.DashboardSource` over a coordinator's SQLite store.

The store is opened read-only (``file:...?mode=ro``): the dashboard can watch a live
coordinator's store, or a finished run's, and can never change it. Changes made by the
coordinator are noticed through ``PRAGMA data_version``, which changes whenever another
connection commits.

Every assumption about the store's layout lives in this module: :data:`STORE_SCHEMA` is
the schema the queries below are written against (tests build stores from it).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .source import ClientRecord, ClientRoundRecord, HeadImportanceRecord, RoundRecord, RunRecord

SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

# The coordinator store as the dashboard reads it. Timestamps are unix seconds (ISO-8601
# text is accepted too); JSON columns hold UTF-8 JSON text.
STORE_SCHEMA = """
CREATE TABLE meta (            -- one row per key: schema_version, run_id, created_at
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE run_config (      -- a single row
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    config_json TEXT NOT NULL
);
CREATE TABLE rounds (
    id                  INTEGER PRIMARY KEY,
    status              TEXT NOT NULL,
    started_at          REAL,
    ended_at            REAL,
    sampled             INTEGER NOT NULL DEFAULT 0,
    replied             INTEGER NOT NULL DEFAULT 0,
    dropped             INTEGER NOT NULL DEFAULT 0,
    rejected            INTEGER NOT NULL DEFAULT 0,
    train_loss          REAL,
    val_loss            REAL,
    bytes_up            INTEGER NOT NULL DEFAULT 0,
    bytes_down          INTEGER NOT NULL DEFAULT 0,
    fedavg_fp32_bytes   INTEGER,
    aggregation_seconds REAL,
    reason              TEXT
);
CREATE TABLE clients (
    name          TEXT PRIMARY KEY,
    status        TEXT NOT NULL,
    last_seen     REAL,
    rounds_joined INTEGER NOT NULL DEFAULT 0,
    bytes_up      INTEGER NOT NULL DEFAULT 0,
    bytes_down    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE client_rounds (
    round_id         INTEGER NOT NULL REFERENCES rounds(id),
    client           TEXT NOT NULL REFERENCES clients(name),
    bytes_up         INTEGER NOT NULL DEFAULT 0,
    bytes_down       INTEGER NOT NULL DEFAULT 0,
    local_loss       REAL,
    num_examples     INTEGER,
    rejection_reason TEXT,
    PRIMARY KEY (round_id, client)
);
CREATE TABLE head_importance (  -- the global importance after a round
    round_id    INTEGER PRIMARY KEY REFERENCES rounds(id),
    scores_json TEXT NOT NULL,  -- [[float]] layers x heads
    mask_json   TEXT            -- [[bool]] layers x heads, true = active; NULL if not recorded
);
"""

REQUIRED_TABLES = ("meta", "run_config", "rounds", "clients", "client_rounds", "head_importance")


class StoreError(RuntimeError):
    """The store cannot be used: missing, not SQLite, not a fedmla store, unsupported version."""


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value)
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text).timestamp()


def _real(value: Any) -> float | None:
    # SQLite stores NaN as NULL; an infinity survives and is kept (views turn it into null).
    return None if value is None else float(value)


class SqliteSource:
    """Reads one run from a coordinator store, read-only. Safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"store file not found: {self.path}")
        if not self.path.is_file():
            raise StoreError(f"store path is not a file: {self.path}")
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._data_version: int | None = None
        self._version = 0
        try:
            self._check()
        except BaseException:
            self._conn.close()
            raise

    def _check(self) -> None:
        try:
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a SQLite database ({e})") from e
        missing = [t for t in REQUIRED_TABLES if t not in tables]
        if missing:
            raise StoreError(f"{self.path} is not a fedmla store: missing table(s) {', '.join(missing)}")
        meta = self._meta()
        if "run_id" not in meta or "schema_version" not in meta:
            raise StoreError(f"{self.path} is not a fedmla store: its meta table has no run_id or schema_version")
        try:
            version = int(meta["schema_version"])
        except ValueError:
            raise StoreError(f"{self.path}: schema_version {meta['schema_version']!r} is not an integer") from None
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise StoreError(f"{self.path} has store schema version {version}; this dashboard reads "
                             f"version(s) {', '.join(map(str, sorted(SUPPORTED_SCHEMA_VERSIONS)))}")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _meta(self) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self._query("SELECT key, value FROM meta")}

    # ---- DashboardSource ------------------------------------------------------------
    def version(self) -> int:
        with self._lock:
            dv = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if dv != self._data_version:
                self._data_version = dv
                self._version += 1
            return self._version

    def run(self) -> RunRecord:
        meta = self._meta()
        rows = self._query("SELECT config_json FROM run_config WHERE id = 1")
        config = json.loads(rows[0]["config_json"]) if rows else {}
        if not isinstance(config, dict):
            raise StoreError(f"{self.path}: run_config.config_json is not a JSON object")
        return RunRecord(run_id=meta["run_id"], schema_version=int(meta["schema_version"]),
                         created_at=_timestamp(meta.get("created_at")), config=config)

    def rounds(self) -> list[RoundRecord]:
        rows = self._query(
            "SELECT id, status, started_at, ended_at, sampled, replied, dropped, rejected, train_loss, val_loss,"
            " bytes_up, bytes_down, fedavg_fp32_bytes, aggregation_seconds, reason FROM rounds ORDER BY id")
        return [RoundRecord(
            id=r["id"], status=r["status"], started_at=_timestamp(r["started_at"]), ended_at=_timestamp(r["ended_at"]),
            sampled=r["sampled"] or 0, replied=r["replied"] or 0, dropped=r["dropped"] or 0, rejected=r["rejected"] or 0,
            train_loss=_real(r["train_loss"]), val_loss=_real(r["val_loss"]),
            bytes_up=r["bytes_up"] or 0, bytes_down=r["bytes_down"] or 0, fedavg_fp32_bytes=r["fedavg_fp32_bytes"],
            aggregation_seconds=_real(r["aggregation_seconds"]), reason=r["reason"],
        ) for r in rows]

    def clients(self) -> list[ClientRecord]:
        rows = self._query("SELECT name, status, last_seen, rounds_joined, bytes_up, bytes_down FROM clients ORDER BY name")
        return [ClientRecord(name=r["name"], status=r["status"], last_seen=_timestamp(r["last_seen"]),
                             rounds_joined=r["rounds_joined"] or 0, bytes_up=r["bytes_up"] or 0,
                             bytes_down=r["bytes_down"] or 0) for r in rows]

    _CLIENT_ROUND_COLUMNS = "round_id, client, bytes_up, bytes_down, local_loss, num_examples, rejection_reason"

    @staticmethod
    def _client_round(r: sqlite3.Row) -> ClientRoundRecord:
        return ClientRoundRecord(round_id=r["round_id"], client=r["client"], bytes_up=r["bytes_up"] or 0,
                                 bytes_down=r["bytes_down"] or 0, local_loss=_real(r["local_loss"]),
                                 num_examples=r["num_examples"], rejection_reason=r["rejection_reason"])

    def client_rounds(self, round_id: int | None = None, client: str | None = None) -> list[ClientRoundRecord]:
        where, args = [], []
        if round_id is not None:
            where.append("round_id = ?")
            args.append(round_id)
        if client is not None:
            where.append("client = ?")
            args.append(client)
        sql = f"SELECT {self._CLIENT_ROUND_COLUMNS} FROM client_rounds"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [self._client_round(r) for r in self._query(sql + " ORDER BY round_id, client", tuple(args))]

    def latest_client_rounds(self) -> list[ClientRoundRecord]:
        rows = self._query(
            f"SELECT {self._CLIENT_ROUND_COLUMNS} FROM client_rounds AS cr"
            " WHERE round_id = (SELECT MAX(round_id) FROM client_rounds WHERE client = cr.client) ORDER BY client")
        return [self._client_round(r) for r in rows]

    def head_importance_rounds(self) -> list[int]:
        return [r[0] for r in self._query("SELECT round_id FROM head_importance ORDER BY round_id")]

    def head_importance(self, round_id: int) -> HeadImportanceRecord | None:
        rows = self._query("SELECT round_id, scores_json, mask_json FROM head_importance WHERE round_id = ?", (round_id,))
        if not rows:
            return None
        r = rows[0]
        scores = [[math.nan if x is None else x for x in row] for row in json.loads(r["scores_json"])]
        mask = json.loads(r["mask_json"]) if r["mask_json"] is not None else None
        return HeadImportanceRecord(round_id=r["round_id"], scores=scores, mask=mask)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
