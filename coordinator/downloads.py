"""What a worker downloads to get the current global model, and the caches behind it.

A worker tells the coordinator which version it holds (``since_version``). It gets
nothing when it is current, the chain of the codec's downlinks since its version when
it is at most ``keep_downlinks`` behind and the chain is no larger than the full state,
and otherwise the full state (fp32 weights and the codec's shared state). Every payload
comes with its SHA-256, and the worker checks its reconstruction against the model hash.
"""

from __future__ import annotations

from fedmla.protos.codec import SharedState
from fedmla.protos.codec.catchup import plan_catchup
from fedmla.protos.codec.transfer import encode_full_state
from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.weights import canonical_bytes, sha256_hex

from .store import Store

Download = tuple[int, int, bytes, str]    # (kind, base version, payload, payload sha256)


class DownloadService:
    def __init__(self, store: Store, keep_downlinks: int):
        self.store, self.keep_downlinks = store, keep_downlinks
        self._full: tuple[int, bytes, str] | None = None     # (version, full state, sha256)
        self._chains: dict[int, tuple[bytes, str]] = {}       # since -> chain to the current version
        self._downlinks: dict[int, bytes] = {}                # version -> the downlink that produced it

    def committed(self, version: int, downlink: bytes) -> None:
        """A round committed ``version``, produced by ``downlink``."""
        self._chains.clear()
        self._downlinks[version] = downlink
        for v in [v for v in self._downlinks if v <= version - self.keep_downlinks]:
            del self._downlinks[v]

    def _full_state(self, version: int, state, shared: SharedState) -> tuple[bytes, str]:
        if self._full is None or self._full[0] != version:
            full = encode_full_state(state, shared)
            self._full = (version, full, sha256_hex(full))
        return self._full[1], self._full[2]

    def _chain(self, since: int, version: int) -> list[bytes] | None:
        """The downlinks from ``since`` to ``version`` (cache, else store), or None when any
        is no longer kept (more than ``keep_downlinks`` behind)."""
        if version - since > self.keep_downlinks:
            return None
        chain = [self._downlinks.get(v) for v in range(since + 1, version + 1)]
        if any(c is None for c in chain):
            chain = self.store.downlinks(since, version)
        return chain

    def payload(self, since: int | None, version: int, state, shared: SharedState) -> Download:
        """The cheapest exact download from ``since`` (None: holds nothing) to ``version``,
        chosen by the codec's own :func:`~fedmla.protos.codec.catchup.plan_catchup`."""
        full, full_sha = self._full_state(version, state, shared)
        if since is not None and 0 <= since <= version:
            if since in self._chains:
                data, sha = self._chains[since]
                return cpb.DownloadModelResponse.CODEC_CHAIN, since, data, sha
            chain = self._chain(since, version) if since < version else []
            sizes = [None] * since + ([len(c) for c in chain] if chain is not None else [None] * (version - since))
            plan = plan_catchup(since, version, sizes, len(full), seeded=False)
            if plan.kind == "none":
                empty = canonical_bytes({})
                return cpb.DownloadModelResponse.DELTA, since, empty, sha256_hex(empty)
            if plan.kind == "chain":
                data = cpb.CodecDownlinks(base_version=since, downlinks=chain).SerializeToString()
                self._chains[since] = (data, sha256_hex(data))
                return cpb.DownloadModelResponse.CODEC_CHAIN, since, data, self._chains[since][1]
        return cpb.DownloadModelResponse.CODEC_FULL, 0, full, full_sha
