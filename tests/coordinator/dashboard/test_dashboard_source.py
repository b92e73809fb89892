"""InMemorySource and SqliteSource: same run in, same records out; bad stores named clearly."""

import sqlite3

import pytest

import dashboard_runs as runs
from coordinator.dashboard.source import (ClientRoundRecord, DashboardSource, HeadImportanceRecord, InMemorySource,
                                          RoundRecord)
from coordinator.dashboard.sqlite_source import SqliteSource, StoreError


def test_in_memory_source_upserts_and_counts_changes():
    s = InMemorySource("r")
    assert isinstance(s, DashboardSource)
    v0 = s.version()
    s.put_round(RoundRecord(id=2, status="running"))
    s.put_round(RoundRecord(id=1, status="completed", started_at=0, ended_at=1))
    s.put_round(RoundRecord(id=2, status="completed", started_at=1, ended_at=2))
    assert s.version() == v0 + 3
    assert [(r.id, r.status) for r in s.rounds()] == [(1, "completed"), (2, "completed")]
    s.put_client_round(ClientRoundRecord(round_id=1, client="b", local_loss=1.0))
    s.put_client_round(ClientRoundRecord(round_id=2, client="b", local_loss=0.5))
    s.put_client_round(ClientRoundRecord(round_id=1, client="a", rejection_reason="nan in update"))
    assert [(r.round_id, r.client) for r in s.latest_client_rounds()] == [(1, "a"), (2, "b")]
    assert [r.client for r in s.client_rounds(round_id=1)] == ["a", "b"]
    assert [r.round_id for r in s.client_rounds(client="b")] == [1, 2]
    s.put_head_importance(HeadImportanceRecord(round_id=2, scores=[[1.0]]))
    assert s.head_importance_rounds() == [2] and s.head_importance(1) is None


def test_sqlite_source_reads_back_exactly_what_the_memory_source_holds(tmp_path):
    mem, _ = runs.make_source("memory", tmp_path)
    sql, writer = runs.make_source("sqlite", tmp_path)
    try:
        assert isinstance(sql, DashboardSource)
        assert sql.run() == mem.run() == runs.run_record()
        assert sql.rounds() == mem.rounds()
        assert sql.clients() == mem.clients()
        assert sql.client_rounds() == mem.client_rounds()
        assert sql.client_rounds(round_id=3) == mem.client_rounds(round_id=3)
        assert sql.client_rounds(round_id=2, client="client-c") == mem.client_rounds(round_id=2, client="client-c")
        assert sql.latest_client_rounds() == mem.latest_client_rounds()
        assert sql.head_importance_rounds() == mem.head_importance_rounds() == [1, 2, 3]
        assert sql.head_importance(2) == mem.head_importance(2)
        assert sql.head_importance(9) is None
        # facts the example run was built with, as read from the store
        r3 = sql.rounds()[-1]
        assert (r3.sampled, r3.replied, r3.dropped, r3.rejected) == (3, 2, 0, 1)
        b3 = sql.client_rounds(round_id=3, client="client-b")[0]
        assert b3.rejection_reason == runs.REJECTION
    finally:
        sql.close()
        writer.close()


def test_sqlite_source_sees_commits_of_a_live_writer_and_nothing_else(sqlite_store):
    source = SqliteSource(sqlite_store.path)
    try:
        v = source.version()
        assert source.version() == v and source.rounds() == []
        sqlite_store.write(runs.round_start(1))
        v1 = source.version()
        assert v1 != v
        assert [(r.id, r.status) for r in source.rounds()] == [(1, "running")]
        assert source.version() == v1
        sqlite_store.write(runs.round_end(1))
        assert source.version() != v1
        assert source.rounds()[0].ended_at is not None
    finally:
        source.close()


def test_sqlite_source_is_read_only(sqlite_store):
    source = SqliteSource(sqlite_store.path)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            source._conn.execute("INSERT INTO meta VALUES ('x', 'y')")
    finally:
        source.close()


def test_rollback_journal_store_works_too(tmp_path):
    writer = runs.SqliteWriter(tmp_path / "plain.sqlite", wal=False)
    writer.write(runs.round_end(1))
    source = SqliteSource(writer.path)
    try:
        assert [r.id for r in source.rounds()] == [1]
    finally:
        source.close()
        writer.close()


def test_missing_store_is_named(tmp_path):
    with pytest.raises(StoreError, match=r"store file not found: .*nope\.sqlite"):
        SqliteSource(tmp_path / "nope.sqlite")
    with pytest.raises(StoreError, match="is not a file"):
        SqliteSource(tmp_path)


def test_not_sqlite_is_named(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("these are not the tables you are looking for\n" * 20)
    with pytest.raises(StoreError, match=r"notes\.txt is not a SQLite database"):
        SqliteSource(p)


def test_other_sqlite_database_is_not_a_fedmla_store(tmp_path):
    p = tmp_path / "other.db"
    with sqlite3.connect(p) as c:
        c.execute("CREATE TABLE rounds (id INTEGER)")
    with pytest.raises(StoreError, match=r"other\.db is not a fedmla store: missing table\(s\) meta, run_config, clients"):
        SqliteSource(p)


def test_meta_without_run_id_and_unsupported_schema_version(tmp_path):
    w = runs.SqliteWriter(tmp_path / "a.sqlite", schema_version=99)
    with pytest.raises(StoreError, match="schema version 99; this dashboard reads version"):
        SqliteSource(w.path)
    w.conn.execute("DELETE FROM meta WHERE key = 'run_id'")
    with pytest.raises(StoreError, match="no run_id or schema_version"):
        SqliteSource(w.path)
    w.close()


def test_iso_timestamps_are_accepted(sqlite_store):
    sqlite_store.conn.execute("INSERT INTO rounds (id, status, started_at, ended_at) VALUES "
                              "(1, 'completed', '2027-01-15T08:00:00+00:00', '2027-01-15T08:00:30+00:00')")
    source = SqliteSource(sqlite_store.path)
    try:
        r = source.rounds()[0]
        assert r.ended_at - r.started_at == 30.0
    finally:
        source.close()
