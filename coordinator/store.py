"""The coordinator's durable state: one SQLite file and safetensors checkpoints.

(The schema, its migration and every transaction that commits a round live together, so
what is written atomically is seen in one place; the records it reads and writes are in
:mod:`.records`, the crash-safe file writes and verified reads in :mod:`.durable`.)

Layout of a store directory::

    STORE/fedmla.sqlite                      the database below
    STORE/checkpoints/model-v000003.safetensors   global model after 3 committed rounds

Schema (version 2; a read-only dashboard may read every table)::

    meta(key TEXT PRIMARY KEY, value TEXT)
        app='fedmla-coordinator', schema_version='2', run_id, created_at,
        model_config (MLAConfig JSON), run_config (coordinator settings JSON)
    tokens(token_id TEXT PK, client TEXT, secret_sha256 TEXT, created_at REAL, revoked_at REAL)
    clients(name TEXT PK, status TEXT  -- joined | left | inactive
            , joined_at REAL, last_seen REAL, rounds_joined INT, bytes_up INT, bytes_down INT,
            capabilities TEXT  -- JSON)
    models(version INT PK, round_id INT, path TEXT, sha256 TEXT, created_at REAL,
           pruned INT  -- 1 once the checkpoint file has been deleted to save space
           , codec_path TEXT, codec_sha256 TEXT  -- the codec's coordinator state (codec runs))
    rounds(id INT PK, status TEXT  -- committed | failed
           , model_version INT  -- version produced (committed) or unchanged (failed)
           , base_version INT, started_at REAL, ended_at REAL, sampled INT, replied INT,
           dropped INT, rejected INT, train_loss REAL, val_loss REAL, bytes_up INT,
           bytes_down INT, fedavg_fp32_bytes INT, aggregation_s REAL, reason TEXT)
    client_rounds(round_id INT, client TEXT, status TEXT  -- replied | dropped | rejected
                  , bytes_up INT, bytes_down INT, local_loss REAL, num_examples INT,
                  rejection_reason TEXT, metrics TEXT  -- JSON, PRIMARY KEY(round_id, client))
    head_importance(round_id INT PK, num_layers INT, num_heads INT, scores TEXT  -- JSON (L, H)
                    , mask TEXT  -- JSON (L, H) of 0/1: the round's active heads)
    downlinks(version INT PK  -- the model version this codec downlink produces
              , round_id INT, data BLOB  -- serialized fedmla.v1.ModelUpdate, sha256 TEXT)

A version-1 store (no codec columns, no mask, no downlinks) is migrated in place, in one
transaction, the first time a coordinator opens it.

Commit protocol (one per round): the checkpoint is written to a temporary file,
fsynced and renamed into place (directory fsynced), then ONE SQLite transaction
records the model version, the round, its per-client rows, head importance and client
totals. The database row pointing at the checkpoint is written last, so a process
killed at any moment leaves either the old round or the new one, never half of one;
an orphan checkpoint from an interrupted commit is overwritten by the next commit.

A store that is not a SQLite database, lacks the ``meta`` marks, has another schema
version, was made for a different model, or whose latest checkpoint is missing or
fails its SHA-256 is refused with :class:`~coordinator.errors.StoreError`.

Kept in one file (over 500 lines): every table, migration and transaction of the store
shares one SQLite connection and its transaction helper; split by table, each part would
reach into the others' rows within one transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import sqlite3
import time
import uuid
from pathlib import Path

from .errors import StoreError, Unauthenticated
from .durable import read_verified, write_atomic, write_tensors_atomic
from .records import ClientRoundRecord, ModelRecord, RoundRecord  # noqa: F401 (part of the store's API)

APP = "fedmla-coordinator"
SCHEMA_VERSION = "2"
DB_NAME = "fedmla.sqlite"
CKPT_DIR = "checkpoints"
TOKEN_PREFIX = "fm1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens(token_id TEXT PRIMARY KEY, client TEXT NOT NULL, secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL, revoked_at REAL);
CREATE INDEX IF NOT EXISTS tokens_client ON tokens(client);
CREATE TABLE IF NOT EXISTS clients(name TEXT PRIMARY KEY, status TEXT NOT NULL, joined_at REAL, last_seen REAL,
    rounds_joined INTEGER NOT NULL DEFAULT 0, bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0, capabilities TEXT);
CREATE TABLE IF NOT EXISTS models(version INTEGER PRIMARY KEY, round_id INTEGER, path TEXT NOT NULL,
    sha256 TEXT NOT NULL, created_at REAL NOT NULL, pruned INTEGER NOT NULL DEFAULT 0, codec_path TEXT,
    codec_sha256 TEXT);
CREATE TABLE IF NOT EXISTS rounds(id INTEGER PRIMARY KEY, status TEXT NOT NULL, model_version INTEGER NOT NULL,
    base_version INTEGER NOT NULL, started_at REAL, ended_at REAL, sampled INTEGER, replied INTEGER,
    dropped INTEGER, rejected INTEGER, train_loss REAL, val_loss REAL, bytes_up INTEGER, bytes_down INTEGER,
    fedavg_fp32_bytes INTEGER, aggregation_s REAL, reason TEXT);
CREATE TABLE IF NOT EXISTS client_rounds(round_id INTEGER NOT NULL, client TEXT NOT NULL, status TEXT NOT NULL,
    bytes_up INTEGER, bytes_down INTEGER, local_loss REAL, num_examples INTEGER, rejection_reason TEXT,
    metrics TEXT, PRIMARY KEY(round_id, client));
CREATE TABLE IF NOT EXISTS head_importance(round_id INTEGER PRIMARY KEY, num_layers INTEGER, num_heads INTEGER,
    scores TEXT, mask TEXT);
CREATE TABLE IF NOT EXISTS downlinks(version INTEGER PRIMARY KEY, round_id INTEGER, data BLOB NOT NULL,
    sha256 TEXT NOT NULL);
"""
_TABLES = {"meta", "tokens", "clients", "models", "rounds", "client_rounds", "head_importance", "downlinks"}
# Version 1 -> 2: codec state next to checkpoints, the round's head mask, codec downlinks.
_MIGRATE_1_2 = """
ALTER TABLE models ADD COLUMN codec_path TEXT;
ALTER TABLE models ADD COLUMN codec_sha256 TEXT;
ALTER TABLE head_importance ADD COLUMN mask TEXT;
CREATE TABLE IF NOT EXISTS downlinks(version INTEGER PRIMARY KEY, round_id INTEGER, data BLOB NOT NULL,
    sha256 TEXT NOT NULL);
UPDATE meta SET value='2' WHERE key='schema_version';
"""


class Store:
    """Open (and if asked, create) a store directory; see the module docstring."""

    def __init__(self, root: str | Path, create: bool = True):
        self.root = Path(root)
        self.token_writes = 0     # token creations and revocations through this connection
        self.db_path = self.root / DB_NAME
        self.ckpt_dir = self.root / CKPT_DIR
        if not self.db_path.exists():
            if not create:
                raise StoreError(f"no fedmla store at {self.root} ({DB_NAME} missing)")
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"store path {self.root} exists and is not a directory")
            if self.root.exists():
                foreign = sorted(p.name for p in self.root.iterdir() if p.name not in (CKPT_DIR,))
                if foreign:
                    raise StoreError(f"store directory {self.root} is not empty and holds no {DB_NAME} "
                                     f"(found {foreign[:5]}); refusing to use a foreign directory")
            self.root.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)
            self.db = self._connect()
            # One script, one transaction: a crash leaves no half-made store behind.
            inserts = "".join(f"INSERT INTO meta(key, value) VALUES ('{k}', '{v}');" for k, v in [
                ("app", APP), ("schema_version", SCHEMA_VERSION), ("run_id", uuid.uuid4().hex),
                ("created_at", repr(time.time()))])
            self.db.executescript(f"BEGIN;{_SCHEMA}{inserts}COMMIT;")
        else:
            self.db = self._connect()
            self._check()
        self.ckpt_dir.mkdir(exist_ok=True)

    @contextlib.contextmanager
    def _tx(self):
        """One write transaction (the connection is in autocommit mode otherwise)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            return db
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.db_path} is not a usable SQLite database ({e}); it is corrupt or not a "
                             f"fedmla store. Refusing to touch it: move it away or choose another --store") from None

    def _check(self) -> None:
        try:
            ok = self.db.execute("PRAGMA quick_check").fetchone()[0]
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.db_path} is corrupt or not a SQLite database ({e}); refusing to use it") from None
        if ok != "ok":
            raise StoreError(f"{self.db_path} failed SQLite's integrity check ({ok}); refusing to use it")
        if "meta" not in tables:
            raise StoreError(f"{self.db_path} is a SQLite database but not a fedmla store (no meta table)")
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        if meta.get("app") != APP:
            raise StoreError(f"{self.db_path} belongs to {meta.get('app')!r}, not {APP!r}; refusing to use it")
        if meta.get("schema_version") == "1" and {"models", "head_importance"} <= tables:
            try:
                self.db.executescript(f"BEGIN;{_MIGRATE_1_2}COMMIT;")
            except sqlite3.DatabaseError as e:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise StoreError(f"{self.db_path}: migrating schema version 1 to 2 failed ({e}); the store is "
                                 f"unchanged") from None
            tables.add("downlinks")
            meta["schema_version"] = SCHEMA_VERSION
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{self.db_path} has schema version {meta.get('schema_version')!r}; this coordinator "
                             f"reads version {SCHEMA_VERSION}")
        missing = _TABLES - tables
        if missing:
            raise StoreError(f"{self.db_path} lacks tables {sorted(missing)}; the store is damaged")

    # ---- meta --------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @property
    def run_id(self) -> str:
        return self.meta("run_id")

    def bind_run(self, model_config_json: str, run_config_json: str) -> None:
        """Record the model config on first start; afterwards refuse a different model."""
        stored = self.meta("model_config")
        if stored is None:
            with self._tx():
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('model_config', ?)", (model_config_json,))
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('run_config', ?)", (run_config_json,))
            return
        if json.loads(stored) != json.loads(model_config_json):
            raise StoreError(f"store {self.root} was made for another model config ({stored}); this coordinator "
                             f"runs {model_config_json}. Use a new --store for a new model")
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('run_config', ?)", (run_config_json,))

    # ---- tokens ------------------------------------------------------------------
    def create_token(self, client: str) -> str:
        if not client or len(client) > 128 or not all(c.isalnum() or c in "-_." for c in client):
            raise ValueError(f"client name {client!r} must be 1-128 characters of letters, digits, '-', '_', '.'")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self._tx():
            self.db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, NULL)",
                            (token_id, client, hashlib.sha256(secret.encode()).hexdigest(), time.time()))
        self.token_writes += 1
        return f"{TOKEN_PREFIX}.{token_id}.{secret}"

    def revoke_tokens(self, client: str) -> int:
        with self._tx():
            cur = self.db.execute("UPDATE tokens SET revoked_at=? WHERE client=? AND revoked_at IS NULL",
                                  (time.time(), client))
        self.token_writes += 1
        return cur.rowcount

    def list_tokens(self) -> list[dict]:
        rows = self.db.execute("SELECT token_id, client, created_at, revoked_at FROM tokens ORDER BY client, created_at")
        return [dict(token_id=r[0], client=r[1], created_at=r[2], revoked_at=r[3]) for r in rows]

    def tokens_version(self) -> tuple[int, int]:
        """Changes whenever the token table may have: another connection committed (e.g.
        ``fedmla token revoke`` in another process: SQLite's ``data_version``), or a token
        was created or revoked through this one. This connection's other writes (joins,
        heartbeats, rounds: many per second with a thousand clients) leave it alone."""
        return self.db.execute("PRAGMA data_version").fetchone()[0], self.token_writes

    def token_table(self) -> dict[str, tuple[str, str]]:
        """{token_id: (client, secret_sha256)} for tokens not revoked."""
        rows = self.db.execute("SELECT token_id, client, secret_sha256 FROM tokens WHERE revoked_at IS NULL")
        return {r[0]: (r[1], r[2]) for r in rows}

    # ---- clients -----------------------------------------------------------------
    def upsert_client(self, name: str, status: str, capabilities: dict | None, now: float) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO clients(name, status, joined_at, last_seen, capabilities) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET status=excluded.status, last_seen=excluded.last_seen, "
                "capabilities=COALESCE(excluded.capabilities, clients.capabilities)",
                (name, status, now, now, json.dumps(capabilities) if capabilities is not None else None))

    def set_client_status(self, name: str, status: str, now: float) -> None:
        with self._tx():
            self.db.execute("UPDATE clients SET status=?, last_seen=? WHERE name=?", (status, now, name))

    def clients(self) -> list[dict]:
        cols = ["name", "status", "joined_at", "last_seen", "rounds_joined", "bytes_up", "bytes_down", "capabilities"]
        return [dict(zip(cols, r)) for r in self.db.execute(f"SELECT {', '.join(cols)} FROM clients ORDER BY name")]

    # ---- models and rounds -------------------------------------------------------
    def checkpoint_path(self, version: int) -> Path:
        return self.ckpt_dir / f"model-v{version:06d}.safetensors"

    _MODEL_COLS = "version, round_id, path, sha256, codec_path, codec_sha256"

    def _model_record(self, r) -> ModelRecord | None:
        if r is None:
            return None
        return ModelRecord(r[0], r[1], self.root / r[2], r[3], self.root / r[4] if r[4] else None, r[5])

    def latest_model(self) -> ModelRecord | None:
        return self._model_record(self.db.execute(
            f"SELECT {self._MODEL_COLS} FROM models ORDER BY version DESC LIMIT 1").fetchone())

    def model(self, version: int) -> ModelRecord | None:
        return self._model_record(self.db.execute(
            f"SELECT {self._MODEL_COLS} FROM models WHERE version=? AND pruned=0", (version,)).fetchone())

    def codec_path(self, version: int) -> Path:
        return self.ckpt_dir / f"codec-v{version:06d}.safetensors"

    def read_codec_state(self, rec: ModelRecord) -> bytes | None:
        """The codec state saved with ``rec`` (verified), or None if the version has none."""
        if rec.codec_path is None:
            return None
        return read_verified(rec.codec_path, rec.codec_sha256, "codec state", rec.version)

    def write_codec_state(self, version: int, data: bytes) -> Path:
        """Put a codec state file in place (durably). It is not current until recorded."""
        path = self.codec_path(version)
        write_atomic(path, data)
        return path

    def write_codec_tensors(self, version: int, tensors: dict) -> tuple[Path, str]:
        """:meth:`write_codec_state` of ``canonical_bytes(tensors)``, streamed: (path, SHA-256)."""
        path = self.codec_path(version)
        return path, write_tensors_atomic(path, tensors)

    def downlinks(self, after: int, upto: int) -> list[bytes] | None:
        """The codec downlinks producing versions after+1 .. upto, each verified, or None
        if any of them is no longer kept."""
        rows = self.db.execute("SELECT version, data, sha256 FROM downlinks WHERE version > ? AND version <= ? "
                               "ORDER BY version", (after, upto)).fetchall()
        if [r[0] for r in rows] != list(range(after + 1, upto + 1)):
            return None
        for version, data, sha in rows:
            if hashlib.sha256(data).hexdigest() != sha:
                raise StoreError(f"{self.db_path}: the downlink of model version {version} does not match its "
                                 f"SHA-256; the store is corrupt")
        return [bytes(r[1]) for r in rows]

    def read_checkpoint(self, rec: ModelRecord) -> bytes:
        """The checkpoint's bytes, verified against the SHA-256 the database recorded."""
        return read_verified(rec.path, rec.sha256, "checkpoint", rec.version)

    def last_round_id(self) -> int:
        r = self.db.execute("SELECT MAX(id) FROM rounds").fetchone()
        return r[0] or 0

    def commit_initial(self, data: bytes, sha256: str) -> ModelRecord:
        if self.latest_model() is not None:
            raise StoreError("the store already holds a model; refusing to overwrite it")
        path = self.checkpoint_path(0)
        write_atomic(path, data)
        with self._tx():
            self.db.execute("INSERT INTO models(version, round_id, path, sha256, created_at, pruned) "
                            "VALUES (0, NULL, ?, ?, ?, 0)",
                            (path.relative_to(self.root).as_posix(), sha256, time.time()))
        return ModelRecord(0, None, path, sha256)

    def commit_round(self, rnd: RoundRecord, clients: list[ClientRoundRecord], importance: list[list[float]] | None,
                     checkpoint: tuple[bytes, str] | None, client_seen: dict[str, float],
                     keep_checkpoints: int = 3) -> None:
        """Atomically record one finished round (and its new model, if any).

        The coordinator calls the two halves itself: :meth:`write_checkpoint` on a
        worker thread, :meth:`record_round` on the thread that owns the connection."""
        path = self.write_checkpoint(rnd.model_version, checkpoint[0]) if checkpoint is not None else None
        self.record_round(rnd, clients, importance, (path, checkpoint[1]) if checkpoint is not None else None,
                          client_seen, keep_checkpoints)

    def write_checkpoint(self, version: int, data: bytes) -> Path:
        """Put a checkpoint file in place (durably). It is not current until recorded."""
        path = self.checkpoint_path(version)
        write_atomic(path, data)
        return path

    def write_checkpoint_tensors(self, version: int, state: dict) -> tuple[Path, str]:
        """:meth:`write_checkpoint` of ``canonical_bytes(state)``, streamed: (path, SHA-256,
        which is the model hash of ``state``)."""
        path = self.checkpoint_path(version)
        return path, write_tensors_atomic(path, state)

    def record_round(self, rnd: RoundRecord, clients: list[ClientRoundRecord], importance: list[list[float]] | None,
                     model: tuple[Path, str] | None, client_seen: dict[str, float], keep_checkpoints: int = 3,
                     mask: list[list[int]] | None = None, codec: tuple[Path, str] | None = None,
                     downlink: bytes | None = None, keep_downlinks: int = 64, meta: dict[str, str] | None = None
                     ) -> None:
        """One transaction: the round, its client rows, head importance and mask, client
        totals, the codec downlink and, last, the row that makes ``model`` = (checkpoint
        path, sha256) current, with ``codec`` = (codec state path, sha256) beside it."""
        with self._tx():
            self.db.execute("INSERT INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", (
                rnd.id, rnd.status, rnd.model_version, rnd.base_version, rnd.started_at, rnd.ended_at, rnd.sampled,
                rnd.replied, rnd.dropped, rnd.rejected, rnd.train_loss, rnd.val_loss, rnd.bytes_up, rnd.bytes_down,
                rnd.fedavg_fp32_bytes, rnd.aggregation_s, rnd.reason))
            for c in clients:
                self.db.execute("INSERT OR REPLACE INTO client_rounds VALUES (?,?,?,?,?,?,?,?,?)", (
                    rnd.id, c.client, c.status, c.bytes_up, c.bytes_down, c.local_loss, c.num_examples,
                    c.rejection_reason, json.dumps(c.metrics or {})))
                self.db.execute(
                    "UPDATE clients SET rounds_joined=rounds_joined+?, bytes_up=bytes_up+?, bytes_down=bytes_down+? "
                    "WHERE name=?", (1 if c.status == "replied" else 0, c.bytes_up, c.bytes_down, c.client))
            for name, seen in client_seen.items():
                self.db.execute("UPDATE clients SET last_seen=MAX(COALESCE(last_seen, 0), ?) WHERE name=?", (seen, name))
            if importance is not None:
                self.db.execute("INSERT INTO head_importance(round_id, num_layers, num_heads, scores, mask) "
                                "VALUES (?,?,?,?,?)", (rnd.id, len(importance), len(importance[0]) if importance else 0,
                                                       json.dumps(importance), json.dumps(mask) if mask else None))
            for key, value in (meta or {}).items():
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            if downlink is not None and model is not None:
                self.db.execute("INSERT OR REPLACE INTO downlinks VALUES (?,?,?,?)", (
                    rnd.model_version, rnd.id, downlink, hashlib.sha256(downlink).hexdigest()))
                self.db.execute("DELETE FROM downlinks WHERE version <= ?", (rnd.model_version - keep_downlinks,))
            if model is not None:
                self.db.execute("INSERT INTO models(version, round_id, path, sha256, created_at, pruned, codec_path, "
                                "codec_sha256) VALUES (?, ?, ?, ?, ?, 0, ?, ?)", (
                    rnd.model_version, rnd.id, model[0].relative_to(self.root).as_posix(), model[1], time.time(),
                    codec[0].relative_to(self.root).as_posix() if codec else None, codec[1] if codec else None))
        if model is not None and keep_checkpoints > 0:
            self._prune(keep_checkpoints)

    def set_val_loss(self, model_version: int, loss: float) -> None:
        """Record the held-out loss of a committed model (an evaluator's figure, e.g. simulate's)."""
        with self._tx():
            self.db.execute("UPDATE rounds SET val_loss=? WHERE model_version=? AND status='committed'",
                            (float(loss), model_version))

    def _prune(self, keep: int) -> None:
        old = self.db.execute("SELECT version, path, codec_path FROM models WHERE pruned=0 AND version > 0 "
                              "ORDER BY version DESC LIMIT -1 OFFSET ?", (keep,)).fetchall()
        for version, path, codec_path in old:
            with self._tx():
                self.db.execute("UPDATE models SET pruned=1 WHERE version=?", (version,))
            for p in (path, codec_path):
                if p:
                    try:
                        (self.root / p).unlink()
                    except FileNotFoundError:
                        pass

    def rounds(self) -> list[dict]:
        cur = self.db.execute("SELECT * FROM rounds ORDER BY id")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur]

    def client_rounds(self, round_id: int) -> list[dict]:
        cur = self.db.execute("SELECT * FROM client_rounds WHERE round_id=? ORDER BY client", (round_id,))
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur]

    def close(self) -> None:
        self.db.close()


class TokenChecker:
    """Maps bearer tokens to client names with a constant-time secret compare.

    The token table is cached and reloaded whenever the database changes (SQLite's
    ``data_version``), so ``fedmla token revoke`` takes effect on the next call.
    """

    def __init__(self, store: Store):
        self.store = store
        self._version = None
        self._table: dict[str, tuple[str, str]] = {}

    def _refresh(self) -> None:
        v = self.store.tokens_version()
        if v != self._version:
            self._table = self.store.token_table()
            self._version = v

    def client_for(self, token: str | None) -> str:
        if not token:
            raise Unauthenticated("missing token: send the metadata 'authorization: Bearer <token>' "
                                  "(create one with `fedmla token create --client NAME`)", "auth")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise Unauthenticated("malformed token: expected the form printed by `fedmla token create`", "auth")
        self._refresh()
        entry = self._table.get(parts[1])
        digest = hashlib.sha256(parts[2].encode()).hexdigest()
        # Compare even for an unknown id so that timing does not tell ids apart.
        expected = entry[1] if entry else "0" * 64
        if not hmac.compare_digest(digest, expected) or entry is None:
            raise Unauthenticated("invalid or revoked token", "auth")
        return entry[0]
