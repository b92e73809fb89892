"""A :class:`~coordinator.dashboard.source.DashboardSource` over a coordinator's store.

A store is a directory holding ``fedmla.sqlite`` (and checkpoints the dashboard does
not read); see :mod:`fedmla.coordinator.store` for the schema and its commit protocol. The
database is opened read-only (``file:...?mode=ro``): the dashboard can watch a live
coordinator's store, or a finished run's, and can never change it. Commits by the
coordinator are noticed through ``PRAGMA data_version``, which changes whenever
another connection commits. The ``tokens`` table is never read.

Every assumption about the store's layout lives in this module. :data:`STORE_SCHEMA`
is the coordinator's schema version 1 as the queries below read it (tests build
stores from it); an optional ``mask`` column on ``head_importance`` (JSON (L, H) of
booleans, the active heads of that round) is read when present.
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

APP = "fedmla-coordinator"
DB_NAME = "fedmla.sqlite"
SUPPORTED_SCHEMA_VERSIONS = frozenset({1, 2})

# The coordinator's store, schema version 1 (coordinator/store.py). meta holds app,
# schema_version, run_id, created_at, model_config (MLAConfig JSON) and run_config
# (coordinator settings JSON). Times are unix seconds.
STORE_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tokens(token_id TEXT PRIMARY KEY, client TEXT NOT NULL, secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL, revoked_at REAL);
CREATE TABLE clients(name TEXT PRIMARY KEY, status TEXT NOT NULL, joined_at REAL, last_seen REAL,
    rounds_joined INTEGER NOT NULL DEFAULT 0, bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0, capabilities TEXT);
CREATE TABLE models(version INTEGER PRIMARY KEY, round_id INTEGER, path TEXT NOT NULL,
    sha256 TEXT NOT NULL, created_at REAL NOT NULL, pruned INTEGER NOT NULL DEFAULT 0);
CREATE TABLE rounds(id INTEGER PRIMARY KEY, status TEXT NOT NULL, model_version INTEGER NOT NULL,
    base_version INTEGER NOT NULL, started_at REAL, ended_at REAL, sampled INTEGER, replied INTEGER,
    dropped INTEGER, rejected INTEGER, train_loss REAL, val_loss REAL, bytes_up INTEGER, bytes_down INTEGER,
    fedavg_fp32_bytes INTEGER, aggregation_s REAL, reason TEXT);
CREATE TABLE client_rounds(round_id INTEGER NOT NULL, client TEXT NOT NULL, status TEXT NOT NULL,
    bytes_up INTEGER, bytes_down INTEGER, local_loss REAL, num_examples INTEGER, rejection_reason TEXT,
    metrics TEXT, PRIMARY KEY(round_id, client));
CREATE TABLE head_importance(round_id INTEGER PRIMARY KEY, num_layers INTEGER, num_heads INTEGER,
    scores TEXT);
"""

# The tables read here (tokens and models are not).
REQUIRED_TABLES = ("meta", "clients", "rounds", "client_rounds", "head_importance")


class StoreError(RuntimeError):
    """The store cannot be used: missing, not SQLite, not a fedmla store, unsupported version."""


def store_database(path: str | Path) -> Path:
    """The database of a store given as its directory (as ``fedmla coordinator --store``) or its file."""
    p = Path(path)
    if p.is_dir():
        db = p / DB_NAME
        if not db.is_file():
            raise StoreError(f"no fedmla store at {p}: {DB_NAME} missing")
        return db
    if not p.exists():
        raise StoreError(f"store not found: {p}")
    if not p.is_file():
        raise StoreError(f"store path is neither a directory nor a file: {p}")
    return p


# Tables holding credentials: the dashboard's connection may not read them at all, so no
# query (present or future) can put a token hash on a page.
SECRET_TABLES = frozenset({"tokens"})


def _deny_secrets(action: int, arg1: str | None, arg2: str | None, db_name: str | None, trigger: str | None) -> int:
    if action == sqlite3.SQLITE_READ and arg1 in SECRET_TABLES:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


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
        self.path = store_database(path)
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.set_authorizer(_deny_secrets)
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
        if "meta" not in tables:
            raise StoreError(f"{self.path} is a SQLite database but not a fedmla store (no meta table)")
        meta = self._meta()
        if meta.get("app") != APP:
            raise StoreError(f"{self.path} is not a fedmla store: it belongs to {meta.get('app')!r}, not {APP!r}")
        if "run_id" not in meta or "schema_version" not in meta:
            raise StoreError(f"{self.path} is not a usable fedmla store: its meta table has no run_id or schema_version")
        try:
            version = int(meta["schema_version"])
        except ValueError:
            raise StoreError(f"{self.path}: schema_version {meta['schema_version']!r} is not an integer") from None
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise StoreError(f"{self.path} has store schema version {version}; this dashboard reads "
                             f"version(s) {', '.join(map(str, sorted(SUPPORTED_SCHEMA_VERSIONS)))}")
        missing = [t for t in REQUIRED_TABLES if t not in tables]
        if missing:
            raise StoreError(f"{self.path} lacks table(s) {', '.join(missing)}; the store is damaged")
        columns = {r[1] for r in self._conn.execute("PRAGMA table_info(head_importance)")}
        self._has_mask = "mask" in columns

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

    def _json_object(self, meta: dict[str, str], key: str) -> dict[str, Any] | None:
        if meta.get(key) is None:
            return None  # a store made before the coordinator bound the run
        try:
            value = json.loads(meta[key])
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.path}: meta {key!r} is not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise StoreError(f"{self.path}: meta {key!r} is not a JSON object")
        return value

    def run(self) -> RunRecord:
        meta = self._meta()
        return RunRecord(run_id=meta["run_id"], schema_version=int(meta["schema_version"]),
                         created_at=_timestamp(meta.get("created_at")),
                         config=self._json_object(meta, "run_config") or {},
                         mla_config=self._json_object(meta, "model_config"),
                         privacy=self._json_object(meta, "privacy"))

    def rounds(self) -> list[RoundRecord]:
        rows = self._query(
            "SELECT id, status, model_version, started_at, ended_at, sampled, replied, dropped, rejected, train_loss,"
            " val_loss, bytes_up, bytes_down, fedavg_fp32_bytes, aggregation_s, reason FROM rounds ORDER BY id")
        return [RoundRecord(
            id=r["id"], status=r["status"], started_at=_timestamp(r["started_at"]), ended_at=_timestamp(r["ended_at"]),
            sampled=r["sampled"] or 0, replied=r["replied"] or 0, dropped=r["dropped"] or 0, rejected=r["rejected"] or 0,
            train_loss=_real(r["train_loss"]), val_loss=_real(r["val_loss"]),
            bytes_up=r["bytes_up"] or 0, bytes_down=r["bytes_down"] or 0, fedavg_fp32_bytes=r["fedavg_fp32_bytes"],
            aggregation_seconds=_real(r["aggregation_s"]), reason=r["reason"] or None, model_version=r["model_version"],
        ) for r in rows]

    def clients(self) -> list[ClientRecord]:
        rows = self._query("SELECT name, status, joined_at, last_seen, rounds_joined, bytes_up, bytes_down FROM clients"
                           " ORDER BY name")
        return [ClientRecord(name=r["name"], status=r["status"], joined_at=_timestamp(r["joined_at"]),
                             last_seen=_timestamp(r["last_seen"]),
                             rounds_joined=r["rounds_joined"] or 0, bytes_up=r["bytes_up"] or 0,
                             bytes_down=r["bytes_down"] or 0) for r in rows]

    _CLIENT_ROUND_COLUMNS = "round_id, client, status, bytes_up, bytes_down, local_loss, num_examples, rejection_reason"

    @staticmethod
    def _client_round(r: sqlite3.Row) -> ClientRoundRecord:
        return ClientRoundRecord(round_id=r["round_id"], client=r["client"], status=r["status"], bytes_up=r["bytes_up"] or 0,
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
        return [r[0] for r in self._query("SELECT round_id FROM head_importance WHERE scores IS NOT NULL ORDER BY round_id")]

    def head_importance(self, round_id: int) -> HeadImportanceRecord | None:
        mask_column = ", mask" if self._has_mask else ""
        rows = self._query(f"SELECT round_id, scores{mask_column} FROM head_importance WHERE round_id = ?", (round_id,))
        if not rows or rows[0]["scores"] is None:
            return None
        r = rows[0]
        scores = [[math.nan if x is None else x for x in row] for row in json.loads(r["scores"])]
        mask = json.loads(r["mask"]) if self._has_mask and r["mask"] is not None else None
        return HeadImportanceRecord(round_id=r["round_id"], scores=scores, mask=mask)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
