"""The coordinator's web dashboard: a live, read-only view of a federated run.

- :mod:`.source`: the records of a run and the :class:`DashboardSource` interface,
  with :class:`InMemorySource` for a live coordinator to feed and
  :class:`OverlaySource` (a store's history plus the round in progress);
- :mod:`.sqlite_source`: :class:`SqliteSource`, reading a coordinator store read-only;
- :mod:`.views`: what the page and the JSON API show, derived by pure functions;
- :mod:`.app`: the FastAPI app (page, JSON API, server-sent events);
- :mod:`.server`: :class:`DashboardServer`, serving it from a background thread.
"""

from .app import create_app
from .server import DashboardServer
from .source import (ClientRecord, ClientRoundRecord, DashboardSource, HeadImportanceRecord, InMemorySource,
                     OverlaySource, RoundRecord, RunRecord)

__all__ = [
    "create_app", "DashboardServer", "DashboardSource", "InMemorySource", "OverlaySource",
    "RunRecord", "RoundRecord", "ClientRecord", "ClientRoundRecord", "HeadImportanceRecord",
]
