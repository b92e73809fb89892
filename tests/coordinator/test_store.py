"""The store: atomic commits, refusal of corrupt/foreign stores, tokens."""

import sqlite3

import pytest

from fedmla.coordinator.errors import StoreError
from fedmla.coordinator.rounds import Coordinator
from fedmla.coordinator.store import Store, TokenChecker
from fedmla.coordinator.errors import Unauthenticated
from fedmla.coordinator.testing import settings_for


def new_coordinator(tmp_path, **kw):
    s = settings_for(tmp_path, **kw)
    return Coordinator(s, Store(s.store))


def test_new_store_commits_initial_model_and_reopens(tmp_path):
    c = new_coordinator(tmp_path)
    sha, run = c.model_sha, c.store.run_id
    c.store.close()
    c2 = new_coordinator(tmp_path)
    assert (c2.version, c2.model_sha, c2.store.run_id, c2.next_round_id) == (0, sha, run, 1)


def test_not_sqlite_refused(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "fedmla.sqlite").write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database|corrupt"):
        Store(tmp_path / "store")
    assert (tmp_path / "store" / "fedmla.sqlite").read_bytes() == b"definitely not sqlite" * 100


def test_foreign_sqlite_refused(tmp_path):
    (tmp_path / "store").mkdir()
    db = sqlite3.connect(tmp_path / "store" / "fedmla.sqlite")
    db.execute("CREATE TABLE users(id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a fedmla store"):
        Store(tmp_path / "store")


def test_other_app_or_schema_refused(tmp_path):
    s = Store(tmp_path / "store")
    s.db.execute("UPDATE meta SET value='9' WHERE key='schema_version'")
    s.close()
    with pytest.raises(StoreError, match="schema version '9'"):
        Store(tmp_path / "store")


def test_non_empty_foreign_directory_refused(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        Store(tmp_path / "store")


def test_other_model_config_refused(tmp_path):
    new_coordinator(tmp_path).store.close()
    with pytest.raises(StoreError, match="another model config"):
        new_coordinator(tmp_path, preset="small")


def test_corrupt_checkpoint_refused(tmp_path):
    c = new_coordinator(tmp_path)
    path = c.store.latest_model().path
    c.store.close()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="SHA-256"):
        new_coordinator(tmp_path)
    path.unlink()
    with pytest.raises(StoreError, match="unreadable"):
        new_coordinator(tmp_path)


def test_crash_between_checkpoint_and_database_keeps_old_round(tmp_path, monkeypatch):
    """A commit that dies after the checkpoint file is in place but before the SQLite
    transaction leaves the previous model current; the orphan file is harmless."""
    from fedmla.coordinator import store as store_mod
    from fedmla.coordinator.store import RoundRecord
    c = new_coordinator(tmp_path)
    sha0 = c.model_sha

    def boom(*a, **k):
        raise KeyboardInterrupt("killed")
    rec = RoundRecord(id=1, status="committed", model_version=1, base_version=0, started_at=0, ended_at=1,
                      sampled=1, replied=1, dropped=0, rejected=0)
    real_tx = c.store._tx
    monkeypatch.setattr(c.store, "_tx", boom)
    with pytest.raises(KeyboardInterrupt):
        c.store.commit_round(rec, [], None, (b"orphan bytes", "0" * 64), {})
    monkeypatch.setattr(c.store, "_tx", real_tx)
    assert c.store.checkpoint_path(1).exists()
    c.store.close()
    c2 = new_coordinator(tmp_path)
    assert (c2.version, c2.model_sha, c2.next_round_id) == (0, sha0, 1)
    assert store_mod.write_atomic  # the same writer overwrites the orphan on the next commit


def test_tokens_create_check_revoke(tmp_path):
    s = Store(tmp_path / "store")
    t1, t2 = s.create_token("alice"), s.create_token("bob")
    check = TokenChecker(s)
    assert check.client_for(t1) == "alice" and check.client_for(t2) == "bob"
    assert "secret" not in str(s.list_tokens()) and t1.split(".")[2] not in str(s.db.execute("SELECT * FROM tokens").fetchall())
    assert s.revoke_tokens("alice") == 1
    with pytest.raises(Unauthenticated, match="revoked"):
        check.client_for(t1)
    assert check.client_for(t2) == "bob"
    # revocation from another connection (another process) is seen too
    other = Store(tmp_path / "store", create=False)
    other.revoke_tokens("bob")
    with pytest.raises(Unauthenticated):
        check.client_for(t2)
    with pytest.raises(ValueError, match="client name"):
        s.create_token("bad name!")


def test_streamed_tensor_files_hold_the_canonical_bytes_and_their_hash(tmp_path):
    """The close writes the checkpoint and the codec state straight from the tensors: the
    file must be byte-for-byte canonical_bytes (what workers hash) and the returned
    SHA-256 the model hash."""
    import torch

    from fedmla.coordinator.durable import write_tensors_atomic
    from fedmla.protos.weights import canonical_bytes, model_hash
    g = torch.Generator().manual_seed(0)
    state = {"b.w": torch.randn(3, 5, generator=g), "a.w": torch.randn(7, generator=g).double(),
             "c.t": torch.randn(4, 6, generator=g).t(), "d.i": torch.arange(5)}   # unsorted, a non-contiguous one
    path = tmp_path / "x.safetensors"
    digest = write_tensors_atomic(path, state)
    assert path.read_bytes() == canonical_bytes(state)
    assert digest == model_hash(state)
    assert not list(tmp_path.glob(".*.tmp"))
