"""InMemorySource and SqliteSource: same run in, same records out; bad stores named clearly."""

import sqlite3

import pytest

import dashboard_runs as runs
from fedmla.coordinator.dashboard.source import (ClientRoundRecord, DashboardSource, HeadImportanceRecord, InMemorySource,
                                          OverlaySource, RoundRecord)
from fedmla.coordinator.dashboard.sqlite_source import SqliteSource, StoreError


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


@pytest.mark.parametrize("kind", ["sqlite", "sqlite+mask"])
def test_sqlite_source_reads_back_exactly_what_the_memory_source_holds(kind, tmp_path):
    mem, _ = runs.make_source("memory", tmp_path)
    sql, writer = runs.make_source(kind, tmp_path)
    try:
        assert isinstance(sql, DashboardSource)
        assert sql.run() == mem.run() == runs.run_record()
        ended = [r for r in mem.rounds() if r.ended_at is not None]
        assert sql.rounds() == ended
        assert sql.clients() == mem.clients()
        assert sql.client_rounds() == mem.client_rounds()
        assert sql.client_rounds(round_id=3) == mem.client_rounds(round_id=3)
        assert sql.client_rounds(round_id=2, client="client-c") == mem.client_rounds(round_id=2, client="client-c")
        assert sql.latest_client_rounds() == mem.latest_client_rounds()
        assert sql.head_importance_rounds() == mem.head_importance_rounds() == [1, 2, 3]
        if kind == "sqlite+mask":
            assert sql.head_importance(2) == mem.head_importance(2)
        else:  # the coordinator's schema 1 records no mask
            assert sql.head_importance(2) == mem.head_importance(2).model_copy(update={"mask": None})
        assert sql.head_importance(9) is None
        # facts the example run was built with, as read from the store
        r3 = sql.rounds()[-1]
        assert (r3.status, r3.sampled, r3.replied, r3.dropped, r3.rejected, r3.model_version) == ("committed", 3, 2, 0, 1, 3)
        assert r3.aggregation_seconds == 0.75 and r3.reason == "deadline"
        b3 = sql.client_rounds(round_id=3, client="client-b")[0]
        assert (b3.status, b3.rejection_reason) == ("rejected", runs.REJECTION)
    finally:
        sql.close()
        writer.close()


def test_the_store_is_found_from_its_directory_or_its_file(sqlite_store):
    for path in (sqlite_store.root, sqlite_store.path):
        source = SqliteSource(path)
        try:
            assert source.path == sqlite_store.path and source.run().run_id == runs.RUN_ID
        finally:
            source.close()


def test_sqlite_source_sees_commits_of_a_live_writer_and_nothing_else(sqlite_store):
    source = SqliteSource(sqlite_store.root)
    try:
        v = source.version()
        assert source.version() == v and source.rounds() == []
        sqlite_store.write(runs.round_start(1))  # the coordinator commits client rows only
        v1 = source.version()
        assert v1 != v
        assert source.rounds() == [] and {c.status for c in source.clients()} == {"joined"}
        assert source.version() == v1
        sqlite_store.write(runs.round_end(1))
        assert source.version() != v1
        assert [(r.id, r.status) for r in source.rounds()] == [(1, "committed")]
    finally:
        source.close()


def test_sqlite_source_is_read_only_and_cannot_read_tokens(sqlite_store):
    sqlite_store.conn.execute("INSERT INTO tokens VALUES ('abc', 'client-a', 'f00d', 0, NULL)")
    source = SqliteSource(sqlite_store.root)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            source._conn.execute("INSERT INTO meta VALUES ('x', 'y')")
        with pytest.raises(sqlite3.DatabaseError, match="access to tokens.secret_sha256 is prohibited"):
            source._conn.execute("SELECT secret_sha256 FROM tokens").fetchall()
        assert source.run().run_id == runs.RUN_ID  # other tables read fine
    finally:
        source.close()


def test_a_store_before_the_run_is_bound_has_no_config(tmp_path):
    w = runs.SqliteWriter(tmp_path / "store")
    w.conn.execute("DELETE FROM meta WHERE key IN ('model_config', 'run_config')")
    source = SqliteSource(w.root)
    try:
        assert source.run() == runs.run_record(with_mla_config=False).model_copy(update={"config": {}})
    finally:
        source.close()
        w.close()


def test_missing_store_is_named(tmp_path):
    with pytest.raises(StoreError, match=r"store not found: .*nope"):
        SqliteSource(tmp_path / "nope")
    with pytest.raises(StoreError, match=r"no fedmla store at .*: fedmla\.sqlite missing"):
        SqliteSource(tmp_path)


def test_not_sqlite_is_named(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("these are not the tables you are looking for\n" * 20)
    with pytest.raises(StoreError, match=r"notes\.txt is not a SQLite database"):
        SqliteSource(p)


def test_other_sqlite_databases_are_not_fedmla_stores(tmp_path):
    p = tmp_path / "other.db"
    with sqlite3.connect(p) as c:
        c.execute("CREATE TABLE rounds (id INTEGER)")
    with pytest.raises(StoreError, match=r"other\.db is a SQLite database but not a fedmla store \(no meta table\)"):
        SqliteSource(p)
    w = runs.SqliteWriter(tmp_path / "foreign", app="someone-else")
    with pytest.raises(StoreError, match="belongs to 'someone-else', not 'fedmla-coordinator'"):
        SqliteSource(w.root)
    w.close()


def test_unsupported_schema_version_damaged_store_and_meta_without_run_id(tmp_path):
    w = runs.SqliteWriter(tmp_path / "a", schema_version=99)
    with pytest.raises(StoreError, match="schema version 99; this dashboard reads version"):
        SqliteSource(w.root)
    w.conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    w.conn.execute("DROP TABLE client_rounds")
    with pytest.raises(StoreError, match="lacks table\\(s\\) client_rounds; the store is damaged"):
        SqliteSource(w.root)
    w.conn.execute("DELETE FROM meta WHERE key = 'run_id'")
    with pytest.raises(StoreError, match="no run_id or schema_version"):
        SqliteSource(w.root)
    w.close()


def test_bad_config_json_is_named(sqlite_store):
    sqlite_store.conn.execute("UPDATE meta SET value = '[1, 2]' WHERE key = 'run_config'")
    source = SqliteSource(sqlite_store.root)
    try:
        with pytest.raises(StoreError, match="meta 'run_config' is not a JSON object"):
            source.run()
    finally:
        source.close()


def test_iso_timestamps_are_accepted(sqlite_store):
    sqlite_store.conn.execute("INSERT INTO rounds (id, status, model_version, base_version, started_at, ended_at) VALUES "
                              "(1, 'committed', 1, 0, '2027-01-15T08:00:00+00:00', '2027-01-15T08:00:30+00:00')")
    source = SqliteSource(sqlite_store.root)
    try:
        r = source.rounds()[0]
        assert r.ended_at - r.started_at == 30.0
    finally:
        source.close()


def test_overlay_shows_the_round_in_progress_until_the_store_commits_it(sqlite_store):
    for step in runs.steps(1):
        sqlite_store.write(step)
    overlay = OverlaySource(SqliteSource(sqlite_store.root))
    assert isinstance(overlay, DashboardSource)
    try:
        v = overlay.version()
        assert overlay.version() == v
        # the coordinator opens round 2 and a reply arrives: only the overlay knows
        start = runs.round_start(2)
        overlay.live.put_round(start.round.model_copy(update={"replied": 1, "bytes_up": 3000}))
        overlay.live.put_client_round(ClientRoundRecord(round_id=2, client="client-a", status="replied", bytes_up=3000,
                                                        local_loss=2.9))
        overlay.live.put_client(start.clients[0].model_copy(update={"last_seen": runs.T0 + 25}))
        assert overlay.version() != v
        assert [(r.id, r.status, r.replied) for r in overlay.rounds()] == [(1, "committed", 3), (2, "running", 1)]
        assert [(r.round_id, r.client) for r in overlay.client_rounds(round_id=2)] == [(2, "client-a")]
        latest = {r.client: r.round_id for r in overlay.latest_client_rounds()}
        assert latest == {"client-a": 2, "client-b": 1, "client-c": 1}
        assert {c.name: c.last_seen for c in overlay.clients()}["client-a"] == runs.T0 + 25
        # the store commits round 2: its record wins, the overlay's copy is ignored
        v = overlay.version()
        sqlite_store.write(runs.round_end(2))
        assert overlay.version() != v
        assert [(r.id, r.status, r.replied) for r in overlay.rounds()] == [(1, "committed", 3), (2, "committed", 2)]
        assert [r.status for r in overlay.client_rounds(round_id=2)] == ["replied", "replied", "dropped"]
        assert overlay.head_importance_rounds() == [1, 2]
        assert {c.name: c.status for c in overlay.clients()}["client-c"] == "inactive"  # the store's newer state
        overlay.live.discard_round(2)
        assert overlay.live.rounds() == [] and overlay.live.client_rounds() == []
        assert overlay.run() == runs.run_record()
    finally:
        overlay.close()
