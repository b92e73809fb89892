from __future__ import annotations

import pytest

import dashboard_runs as runs


@pytest.fixture
def sqlite_store(tmp_path):
    """An empty store directory (schema, meta and config only) and its writer; the writer stays open."""
    writer = runs.SqliteWriter(tmp_path / "store")
    yield writer
    writer.close()


@pytest.fixture(params=["memory", "sqlite+mask"])
def finished(request, tmp_path):
    """The whole example run, from either kind of source."""
    source, writer = runs.make_source(request.param, tmp_path)
    yield source
    source.close()
    writer.close()
