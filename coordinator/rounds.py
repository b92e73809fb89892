"""The coordinator's state and round state machine, independent of gRPC.

:class:`Coordinator` holds the global model, the known clients and the open round;
its handler methods (``join``, ``get_task``, ``download``, ``submit``, ``heartbeat``,
``leave``) take the authenticated client name and protocol messages and raise
:mod:`fedmla.coordinator.errors` on refusal. The gRPC servicers in :mod:`fedmla.coordinator.server`
are thin wrappers around them.

Round life cycle (driven by :meth:`Coordinator.run`)::

    WAITING  until `clients_to_start` clients are active (seen within client_timeout_s)
    OPEN     `clients_per_round` clients sampled (seeded, from the sorted active names);
             accepts one update per sampled client for (round_id, base model version)
    CLOSING  when every sampled client replied or left, or the deadline passed;
             later submissions are refused (FAILED_PRECONDITION)
    commit   >= min_replies: spooled updates are decoded and handed to the aggregator
             sorted by client id, the new model and the round are committed atomically;
             otherwise the round is recorded as failed and the model stays
    -> next round (round ids always increase; model version = committed rounds)

Two kinds of update (``settings.updates``):

- ``codec`` (default): the coordinator owns a :class:`~coordinator.codec.ServerCodec`. A
  round's plan (active-head mask from the importance moving average, shared bases) goes
  out with the task and the codec config (``Task.codec.config_json``); workers send
  low-rank quantised updates with importance; at the close the decoded updates are
  aggregated exactly in client-id order, the outer optimiser steps and the codec
  produces the downlink, which the coordinator applies to itself. The downlink is kept
  (store table ``downlinks``) so a worker k versions behind catches up with the chain
  of k downlinks (``CODEC_CHAIN``) instead of the full model (``CODEC_FULL``: weights +
  shared state). The codec's whole state (momentum, residual, importance, bases) is saved
  beside every checkpoint, so a restarted coordinator continues bit-identically.
- ``dense``: fp32 deltas validated by :mod:`fedmla.coordinator.validation`, aggregated by
  :class:`~coordinator.aggregation.FedAvg` or an ``--aggregator`` plug-in; downloads are
  the full model or the changed tensors.

Accepted updates are spooled to ``STORE/spool/round-N/`` while the round is open, so
that memory stays O(model) whatever the number of clients and the aggregation order
does not depend on arrival order. A restarted coordinator discards the spool of the
interrupted round and re-opens that round id from the last committed model.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from google.protobuf.message import DecodeError

from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import types_pb2 as pb

from .aggregation import Aggregator, FedAvg, RoundContext
from .errors import (AlreadyExists, CoordinatorError, FailedPrecondition, InvalidArgument, ResourceExhausted,
                     StoreError)
from .metrics import CoordinatorMetrics
from .settings import CoordinatorSettings
from .store import ClientRoundRecord, RoundRecord, Store
from fedmla.protos.spec import ModelSpec

from .validation import UpdateLimits, decode_update
from fedmla.protos.weights import canonical_bytes, load_safetensors_bytes, model_hash, sha256_hex

log = logging.getLogger("fedmla.coordinator")



@dataclass
class ClientState:
    name: str
    status: str = "joined"           # joined | left
    last_seen: float = 0.0
    capabilities: dict = field(default_factory=dict)


@dataclass
class Reply:
    path: Path
    bytes_up: int
    num_examples: int
    metrics: dict[str, float]


@dataclass
class OpenRound:
    id: int
    base_version: int
    started_at: float
    deadline: float
    sampled: list[str]
    active_heads: torch.Tensor           # (L, H) bool
    replies: dict[str, Reply] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    left: set[str] = field(default_factory=set)
    receiving: set[str] = field(default_factory=set)
    bytes_down: dict[str, int] = field(default_factory=dict)
    closing: bool = False
    plan: object | None = None           # codec runs: the round's coordinator.codec RoundPlan
    dp_rate: float | None = None         # DP runs: the sampling rate the accountant charges for this round

    def pending(self) -> list[str]:
        return [c for c in self.sampled if c not in self.replies and c not in self.left]


def _seed_for(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def make_aggregator(settings: CoordinatorSettings) -> Aggregator:
    if settings.aggregator == "fedavg":
        return FedAvg()
    mod, _, attr = settings.aggregator.partition(":")
    if not attr:
        raise ValueError(f"aggregator {settings.aggregator!r}: use 'fedavg' or 'package.module:factory'")
    return getattr(importlib.import_module(mod), attr)(settings)


class Coordinator:
    def __init__(self, settings: CoordinatorSettings, store: Store | None = None,
                 metrics: CoordinatorMetrics | None = None, aggregator: Aggregator | None = None):
        from .model_source import initial_model
        self.settings = settings
        self.metrics = metrics or CoordinatorMetrics()
        self.store = store or Store(settings.store)
        self.aggregator = aggregator or make_aggregator(settings)
        self.cfg, initial_state, self.tokenizer_json = initial_model(settings, self.store)
        self.spec = ModelSpec.from_config(self.cfg)
        self.config_json = self.cfg.model_dump_json()
        self.store.bind_run(self.config_json, settings.public_json())
        rec = self.store.latest_model()
        if rec is None:
            data = canonical_bytes(initial_state)
            rec = self.store.commit_initial(data, sha256_hex(data))
        data = self.store.read_checkpoint(rec)
        expected = {k: (s, torch.float32) for k, s in self.spec.shapes.items()}
        try:
            self.state = load_safetensors_bytes(data, expected, f"checkpoint {rec.path}")
        except ValueError as e:
            raise StoreError(str(e)) from None
        self.version, self.model_bytes, self.model_sha = rec.version, data, rec.sha256
        self.importance = self._load_importance()
        self.codec = self._load_codec(rec) if settings.updates == "codec" else None
        # The codec's shared state at self.version (the codec's own moves ahead during a commit).
        self.shared = self.codec.shared if self.codec is not None else None
        self._codec_json = settings.codec.model_dump_json()
        self._downlinks: dict[int, bytes] = {}          # version -> the downlink that produced it
        self.accountant = None
        if settings.dp is not None:
            from .privacy import PrivacyAccountant
            saved = self.store.meta("privacy")
            self.accountant = PrivacyAccountant(settings.dp, json.loads(saved)["history"] if saved else None)
        self.stop_reason: str | None = None
        self._full_cache: tuple[int, bytes, str] | None = None
        self.next_round_id = self.store.last_round_id() + 1
        self.clients: dict[str, ClientState] = {}
        now = time.time()
        for c in self.store.clients():
            if c["status"] == "joined":  # give clients of a previous incarnation a chance to come back
                self.clients[c["name"]] = ClientState(c["name"], "joined", now, json.loads(c["capabilities"] or "{}"))
        self.round: OpenRound | None = None
        self.closing_task: asyncio.Future | None = None
        self.finished = False
        self._changed = asyncio.Event()
        self._task_event = asyncio.Event()     # set (and replaced) when a round opens or the run ends
        # Held GetTask calls already waited server-side, so the client may ask again soon.
        self._wait_retry_s = 0.1 if settings.task_long_poll_s > 0 else 0.5
        self._upload_slots = asyncio.Semaphore(settings.max_concurrent_uploads)
        self._delta_cache: dict[int, tuple[bytes, str]] = {}
        self.spool_root = self.store.root / "spool"
        shutil.rmtree(self.spool_root, ignore_errors=True)  # updates of an interrupted round
        self.metrics.model_version.set(self.version)
        self._update_client_gauges()
        log.info("store %s run %s: model version %d (%s), next round %d", self.store.root, self.store.run_id,
                 self.version, self.model_sha[:12], self.next_round_id)

    # ---- helpers ------------------------------------------------------------------
    def _load_codec(self, rec):
        """The codec state at model version ``rec``: saved with it, or fresh (round = version)."""
        from fedmla.protos.codec import ServerCodec
        cfg = self.settings.codec
        stored = self.store.meta("codec_config")
        if stored is not None and json.loads(stored) != json.loads(cfg.model_dump_json()):
            old, new = json.loads(stored), json.loads(cfg.model_dump_json())
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise StoreError(f"store {self.store.root} was run with another codec config (fields {diff} differ: "
                             f"{ {k: old.get(k) for k in diff} } stored, { {k: new.get(k) for k in diff} } now); "
                             f"the codec's state is tied to its config. Keep the config or start a new --store")
        if stored is None:
            self.store.set_meta("codec_config", cfg.model_dump_json())
        codec = ServerCodec(self.cfg, cfg, self.state)
        data = self.store.read_codec_state(rec)
        if data is None:      # a new run, or a store whose earlier rounds were dense
            codec.shared.round = rec.version
            return codec
        try:
            codec.load_state_dict(load_safetensors_bytes(data, None, f"codec state {rec.codec_path}"))
        except ValueError as e:
            raise StoreError(str(e)) from None
        if model_hash(codec.global_state) != rec.sha256 or codec.shared.round != rec.version:
            raise StoreError(f"codec state {rec.codec_path} does not belong to model version {rec.version} "
                             f"(weights or round differ); the store is damaged")
        return codec

    def _load_importance(self) -> torch.Tensor | None:
        row = self.store.db.execute("SELECT scores FROM head_importance ORDER BY round_id DESC LIMIT 1").fetchone()
        return torch.tensor(json.loads(row[0]), dtype=torch.float32) if row else None

    def _update_client_gauges(self) -> None:
        for status in ("joined", "left"):
            self.metrics.clients.labels(status).set(sum(1 for c in self.clients.values() if c.status == status))

    def _reject(self, err: CoordinatorError, client: str | None = None) -> CoordinatorError:
        self.metrics.rejections.labels(err.reason).inc()
        rnd = self.round
        if client and rnd and client in rnd.sampled and client not in rnd.replies:
            rnd.rejected[client] = f"{err.code}: {err.message}"
        return err

    def _known(self, client: str) -> ClientState:
        c = self.clients.get(client)
        if c is None or c.status != "joined":
            raise self._reject(FailedPrecondition(f"client {client!r} has not joined (or has left): call Join first",
                                                  "not_joined"))
        c.last_seen = time.time()
        return c

    def _active(self, now: float) -> list[str]:
        limit = now - self.settings.client_timeout_s
        return sorted(n for n, c in self.clients.items() if c.status == "joined" and c.last_seen >= limit)

    def _head_mask(self, round_id: int) -> torch.Tensor:
        L, H = self.spec.num_layers, self.spec.num_heads
        mask = torch.ones(L, H, dtype=torch.bool)
        s = self.settings
        if s.keep_ratio >= 1.0 or self.importance is None:
            return mask
        k = max(1, math.ceil(s.keep_ratio * H))
        rng = random.Random(_seed_for(s.seed, "heads", round_id))
        mask[:] = False
        for layer in range(L):
            order = sorted(range(H), key=lambda h: (-float(self.importance[layer, h]), h))
            keep = set(order[:k])
            rest = [h for h in range(H) if h not in keep]
            keep.update(rng.sample(rest, min(s.random_heads, len(rest))))
            mask[layer, sorted(keep)] = True
        return mask

    def codec_settings(self) -> pb.CodecSettings:
        s = self.settings
        if self.codec is None:
            return pb.CodecSettings(rank=s.rank, max_rank=s.max_rank, quant_bits=s.quant_bits, keep_ratio=s.keep_ratio,
                                    max_update_bytes=s.max_update_bytes, extra=s.codec_extra)
        c = s.codec
        return pb.CodecSettings(rank=c.rank, max_rank=c.rank, quant_bits=c.factor_bits,
                                keep_ratio=c.keep_ratio if c.head_selection else 1.0,
                                max_update_bytes=s.max_update_bytes, config_json=self._codec_json)

    def limits(self, rnd: OpenRound) -> UpdateLimits:
        return UpdateLimits(max_rank=self.settings.max_rank, max_update_bytes=self.settings.max_update_bytes,
                            active_heads=rnd.active_heads)

    def model_version_msg(self) -> pb.ModelVersion:
        return pb.ModelVersion(version=self.version, sha256=self.model_sha)

    def task_for(self, client: str, rnd: OpenRound) -> pb.Task:
        s = self.settings
        L, H = rnd.active_heads.shape
        return pb.Task(
            round_id=rnd.id, model=self.model_version_msg(),
            hyper=pb.HyperParameters(local_steps=s.local_steps, learning_rate=s.learning_rate, batch_size=s.batch_size,
                                     seq_len=s.seq_len, extra=s.hyper_extra),
            active_heads=pb.HeadMask(num_layers=L, num_heads=H, active=rnd.active_heads.flatten().tolist()),
            codec=self.codec_settings(),
            deadline_unix_ms=int(rnd.deadline * 1000), model_config_json=self.config_json,
            seed=_seed_for(s.seed, "task", rnd.id, client))

    # ---- handlers -----------------------------------------------------------------
    def join(self, client: str, req: cpb.JoinRequest) -> cpb.JoinResponse:
        caps = req.capabilities
        capabilities = dict(device=caps.device, free_memory_bytes=caps.free_memory_bytes,
                            num_examples=caps.num_examples, software_version=caps.software_version, extra=dict(caps.extra))
        if caps.num_examples < 0 or caps.free_memory_bytes < 0:
            raise self._reject(InvalidArgument("capabilities: num_examples and free_memory_bytes must be >= 0",
                                               "capabilities"))
        now = time.time()
        self.clients[client] = ClientState(client, "joined", now, capabilities)
        self.store.upsert_client(client, "joined", capabilities, now)
        self._update_client_gauges()
        self._changed.set()
        return cpb.JoinResponse(client_id=client, run_id=self.store.run_id,
                                heartbeat_interval_s=self.settings.heartbeat_interval_s,
                                model_config_json=self.config_json, model=self.model_version_msg())

    def get_task(self, client: str) -> cpb.GetTaskResponse:
        self._known(client)
        rnd = self.round
        base = dict(current_round=rnd.id if rnd else self.next_round_id, model=self.model_version_msg())
        if self.finished:
            return cpb.GetTaskResponse(status=cpb.GetTaskResponse.FINISHED, **base)
        if rnd is None or rnd.closing or client not in rnd.sampled or client in rnd.left:
            return cpb.GetTaskResponse(status=cpb.GetTaskResponse.WAIT, retry_after_s=self._wait_retry_s, **base)
        if client in rnd.replies:
            return cpb.GetTaskResponse(status=cpb.GetTaskResponse.SUBMITTED, retry_after_s=0.5, **base)
        return cpb.GetTaskResponse(status=cpb.GetTaskResponse.READY, task=self.task_for(client, rnd), **base)

    async def wait_task(self, client: str, max_wait: float | None = None) -> cpb.GetTaskResponse:
        """:meth:`get_task`, but a WAIT answer is held up to ``task_long_poll_s`` (and at
        most ``max_wait``: the caller's deadline) until this client has something else to
        hear: a round that samples it, or the end of the run. Idle clients then cost one
        call per interval instead of a poll every half second."""
        reply = self.get_task(client)
        hold = self.settings.task_long_poll_s if max_wait is None else min(self.settings.task_long_poll_s, max_wait)
        deadline = time.monotonic() + hold
        # A client not sampled in the round that just opened stays parked: waking every
        # idle client at each round start would cost a burst of calls for nothing.
        while reply.status == cpb.GetTaskResponse.WAIT and (left := deadline - time.monotonic()) > 0:
            event = self._task_event
            try:
                await asyncio.wait_for(event.wait(), left)
            except asyncio.TimeoutError:
                pass
            reply = self.get_task(client)
        return reply

    def live_round(self) -> dict | None:
        """The open round as the dashboard shows it before it commits, or None."""
        rnd = self.round
        if rnd is None:
            return None
        return dict(id=rnd.id, status="closing" if rnd.closing else "running", started_at=rnd.started_at,
                    sampled=len(rnd.sampled), replied=len(rnd.replies), rejected=len(rnd.rejected),
                    bytes_up=sum(r.bytes_up for r in rnd.replies.values()), bytes_down=sum(rnd.bytes_down.values()),
                    fedavg_fp32_bytes=len(rnd.replies) * self.spec.num_elements() * 4)

    def notify_tasks(self) -> None:
        """Wake every held GetTask (a round opened, the run ended, or shutdown)."""
        event, self._task_event = self._task_event, asyncio.Event()
        event.set()

    def download(self, client: str, req: cpb.DownloadModelRequest) -> tuple[cpb.DownloadModelResponse.Header, bytes]:
        """The header and payload of a model download (the servicer chunks it)."""
        self._known(client)
        kind, base, data, sha = cpb.DownloadModelResponse.FULL, 0, self.model_bytes, self.model_sha
        if self.codec is not None:
            kind, base, data, sha = self._codec_download(req)
        elif req.HasField("since_version"):
            delta = self._delta(req.since_version)
            if delta is not None:
                kind, base, (data, sha) = cpb.DownloadModelResponse.DELTA, req.since_version, delta
        self.metrics.bytes.labels("down").inc(len(data))
        if self.round is not None:
            self.round.bytes_down[client] = self.round.bytes_down.get(client, 0) + len(data)
        header = cpb.DownloadModelResponse.Header(kind=kind, model=self.model_version_msg(), base_version=base,
                                                  total_bytes=len(data), payload_sha256=sha)
        return header, data

    def _codec_download(self, req: cpb.DownloadModelRequest) -> tuple[int, int, bytes, str]:
        """(kind, base version, payload, sha256) of a codec run's download: nothing when the
        client is current, the chain of downlinks when it is behind by at most
        ``keep_downlinks`` and the chain is smaller than the full state, else the full state."""
        from fedmla.protos.codec.transfer import encode_full_state
        if self._full_cache is None or self._full_cache[0] != self.version:
            full = encode_full_state(self.state, self.shared)
            self._full_cache = (self.version, full, sha256_hex(full))
        full, full_sha = self._full_cache[1], self._full_cache[2]
        if req.HasField("since_version"):
            since = req.since_version
            if since == self.version:
                empty = canonical_bytes({})
                return cpb.DownloadModelResponse.DELTA, since, empty, sha256_hex(empty)
            if since in self._delta_cache:
                data, sha = self._delta_cache[since]
                return cpb.DownloadModelResponse.CODEC_CHAIN, since, data, sha
            if 0 <= since < self.version and self.version - since <= self.settings.keep_downlinks:
                chain = [self._downlinks.get(v) for v in range(since + 1, self.version + 1)]
                if any(c is None for c in chain):
                    chain = self.store.downlinks(since, self.version)
                if chain is not None and sum(map(len, chain)) < len(full):
                    data = cpb.CodecDownlinks(base_version=since, downlinks=chain).SerializeToString()
                    self._delta_cache[since] = (data, sha256_hex(data))
                    return cpb.DownloadModelResponse.CODEC_CHAIN, since, data, self._delta_cache[since][1]
        return cpb.DownloadModelResponse.CODEC_FULL, 0, full, full_sha

    def _delta(self, since: int) -> tuple[bytes, str] | None:
        """(safetensors bytes of the tensors changed since ``since``, their SHA-256), or
        None when that version is unknown or its checkpoint was pruned."""
        if since in self._delta_cache:
            return self._delta_cache[since]
        if since == self.version:
            empty = canonical_bytes({})
            return empty, sha256_hex(empty)
        rec = self.store.model(since) if 0 <= since < self.version else None
        if rec is None:
            return None
        old = load_safetensors_bytes(self.store.read_checkpoint(rec))
        # Compare bits, not values (-0.0 == 0.0 but the bytes differ).
        changed = {k: v for k, v in self.state.items()
                   if k not in old or old[k].shape != v.shape or not torch.equal(old[k].view(torch.int32), v.view(torch.int32))}
        data = canonical_bytes(changed)
        self._delta_cache[since] = (data, sha256_hex(data))
        return self._delta_cache[since]

    def heartbeat(self, client: str, req: cpb.HeartbeatRequest) -> cpb.HeartbeatResponse:
        c = self.clients.get(client)
        rnd = self.round
        current = rnd.id if rnd else self.next_round_id
        if c is None or c.status != "joined":
            return cpb.HeartbeatResponse(action=cpb.HeartbeatResponse.REJOIN, current_round=current,
                                         heartbeat_interval_s=self.settings.heartbeat_interval_s)
        c.last_seen = time.time()
        stale = req.round_id != 0 and (rnd is None or rnd.closing or req.round_id != rnd.id)
        action = cpb.HeartbeatResponse.NEW_TASK if stale else cpb.HeartbeatResponse.CONTINUE
        return cpb.HeartbeatResponse(action=action, current_round=current,
                                     heartbeat_interval_s=self.settings.heartbeat_interval_s)

    def leave(self, client: str, req: cpb.LeaveRequest) -> cpb.LeaveResponse:
        c = self._known(client)
        c.status = "left"
        self.store.set_client_status(client, "left", time.time())
        if self.round is not None and client in self.round.sampled and client not in self.round.replies:
            self.round.left.add(client)
        self._update_client_gauges()
        self._changed.set()
        return cpb.LeaveResponse()

    def upload_lost(self, client: str) -> None:
        """The client's connection died during its upload: recorded as dropped, not rejected."""
        rnd = self.round
        if rnd is not None and client not in rnd.replies:
            rnd.rejected.pop(client, None)

    def _check_round(self, client: str, round_id: int, model_version: int) -> OpenRound:
        rnd = self.round
        if rnd is None or rnd.closing:
            now_id = rnd.id if rnd else self.next_round_id
            raise FailedPrecondition(f"round {round_id} is not accepting updates (round {now_id} "
                                     f"{'is closing' if rnd else 'has not opened'}); call GetTask", "round_closed")
        if round_id != rnd.id:
            raise FailedPrecondition(f"update is for round {round_id} but the open round is {rnd.id}: late or "
                                     f"replayed updates are refused; call GetTask", "wrong_round")
        if model_version != rnd.base_version:
            raise FailedPrecondition(f"update was trained on model version {model_version} but round {rnd.id} "
                                     f"starts from version {rnd.base_version}; download the model again",
                                     "wrong_version")
        if client not in rnd.sampled:
            raise FailedPrecondition(f"client {client!r} was not sampled for round {rnd.id}", "not_sampled")
        if client in rnd.left:
            raise FailedPrecondition(f"client {client!r} left round {rnd.id}", "not_sampled")
        if client in rnd.replies:
            raise AlreadyExists(f"client {client!r} already submitted an update for round {rnd.id}", "replay")
        return rnd

    async def submit(self, client: str, requests: AsyncIterator) -> cpb.SubmitUpdateResponse:
        """Receive, validate and spool one update from a stream of ``SubmitUpdateRequest``
        (header on the first). Refuses with a CoordinatorError and changes nothing.

        At most ``max_concurrent_uploads`` streams are read at once and the slot is
        taken before the first chunk is read, so memory does not grow with the
        number of clients submitting together."""
        started = time.perf_counter()
        try:
            self._known(client)
            async with self._upload_slots:
                it = requests.__aiter__()
                try:
                    first = await it.__anext__()
                except StopAsyncIteration:
                    first = None
                if first is None or not first.HasField("header"):
                    raise InvalidArgument("the first SubmitUpdate chunk must carry the header (round, version, "
                                          "size, sha256)", "malformed")
                header = first.header
                rnd = self._check_round(client, header.round_id, header.model_version)
                limit = self.settings.max_update_bytes
                if header.total_bytes <= 0:
                    raise InvalidArgument(f"header.total_bytes must be positive, got {header.total_bytes}", "malformed")
                if header.total_bytes > limit:
                    raise ResourceExhausted(f"update of {header.total_bytes} bytes exceeds this round's limit of "
                                            f"{limit} bytes (codec.max_update_bytes)", "size")
                if client in rnd.receiving:
                    raise AlreadyExists(f"an update from {client!r} for round {rnd.id} is already being received",
                                        "replay")
                rnd.receiving.add(client)
                try:
                    payload = await self._read_payload(header, first, it)
                    msg = pb.ModelUpdate()
                    try:
                        msg.ParseFromString(payload)
                    except DecodeError:
                        raise InvalidArgument("payload is not a serialized fedmla.v1.ModelUpdate", "malformed") from None
                    update = await asyncio.to_thread(self._decode, msg, rnd)
                    del msg
                    if self.round is not rnd or rnd.closing:
                        raise FailedPrecondition(f"round {rnd.id} closed while the update was being received",
                                                 "round_closed")
                    path = self.spool_root / f"round-{rnd.id:06d}" / f"{client}.pb"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    await asyncio.to_thread(path.write_bytes, payload)
                finally:
                    rnd.receiving.discard(client)
                    self._changed.set()
        except CoordinatorError as e:
            raise self._reject(e, client) from None
        rnd.replies[client] = Reply(path, len(payload), update.num_examples, update.metrics)
        rnd.rejected.pop(client, None)
        self.metrics.updates.inc()
        self.metrics.bytes.labels("up").inc(len(payload))
        self.metrics.submit_seconds.observe(time.perf_counter() - started)
        self._changed.set()
        return cpb.SubmitUpdateResponse(round_id=rnd.id, bytes_received=len(payload), replies_in_round=len(rnd.replies))

    def _decode(self, msg: pb.ModelUpdate, rnd: OpenRound):
        """Validate one update against the round (a worker thread); raises InvalidArgument."""
        if self.codec is None:
            return decode_update(msg, self.spec, self.limits(rnd))
        from fedmla.protos.codec import UpdateDecodeError
        try:
            return self.codec.decode(msg, rnd.plan)
        except UpdateDecodeError as e:
            raise InvalidArgument(f"update does not fit round {rnd.id}'s codec plan: {e}", "invalid_update") from None

    async def _read_payload(self, header, first, rest: AsyncIterator) -> bytes:
        buf = bytearray(first.data)
        if len(buf) > header.total_bytes:
            raise ResourceExhausted(f"received more than the {header.total_bytes} bytes the header announced", "size")
        async for msg in rest:
            if msg.HasField("header"):
                raise InvalidArgument("only the first SubmitUpdate chunk may carry a header", "malformed")
            data = msg.data
            if len(buf) + len(data) > header.total_bytes:
                raise ResourceExhausted(f"received more than the {header.total_bytes} bytes the header announced",
                                        "size")
            buf += data
        if len(buf) != header.total_bytes:
            raise InvalidArgument(f"stream ended after {len(buf)} of {header.total_bytes} announced bytes", "truncated")
        if sha256_hex(bytes(buf)) != header.payload_sha256:
            raise InvalidArgument("payload SHA-256 does not match header.payload_sha256 (corrupted upload)", "malformed")
        return bytes(buf)

    # ---- round driver -----------------------------------------------------------------
    async def _wait_change(self, timeout: float) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout=max(timeout, 0.0))
        except asyncio.TimeoutError:
            pass

    async def run(self) -> None:
        """Run rounds until the configured number is committed (or cancellation)."""
        s = self.settings
        while True:
            if self.finished:        # e.g. the privacy budget is spent
                return
            if s.rounds and self.version >= s.rounds:
                self.finished = True
                log.info("run finished: %d rounds committed", self.version)
                self._changed.set()
                self.notify_tasks()
                return
            now = time.time()
            active = self._active(now)
            if len(active) < s.clients_to_start:
                await self._wait_change(0.25)
                continue
            await self._run_round(active)

    async def _run_round(self, active: list[str]) -> None:
        s = self.settings
        rid = self.next_round_id
        rng = random.Random(_seed_for(s.seed, "sample", rid))
        sampled = sorted(rng.sample(active, min(s.clients_per_round, len(active))))
        dp_rate = None
        if self.accountant is not None:
            from .defenses import sample_rate
            from .privacy import BudgetExceeded
            dp_rate = sample_rate(len(sampled), len(active))
            try:
                self.accountant.check_round(dp_rate)
            except BudgetExceeded as e:
                self.finished, self.stop_reason = True, f"privacy budget: {e}"
                self.store.set_meta("privacy", json.dumps(self.privacy_summary(exhausted=True)))
                log.warning("not starting round %d: %s", rid, e)
                self._changed.set()
                self.notify_tasks()
                return
        now = time.time()
        if self.codec is not None:
            plan = self.codec.plan()
            rnd = OpenRound(rid, self.version, now, now + s.round_timeout_s, sampled, plan.mask.clone(), plan=plan)
        else:
            rnd = OpenRound(rid, self.version, now, now + s.round_timeout_s, sampled, self._head_mask(rid))
        rnd.dp_rate = dp_rate
        self.round = rnd
        self.notify_tasks()
        self.metrics.current_round.set(rid)
        log.info("round %d open: %d sampled from %d active, base version %d", rid, len(sampled), len(active),
                 self.version)
        while True:
            now = time.time()
            silent = now - s.client_timeout_s
            for c in rnd.pending():
                st = self.clients.get(c)
                if st is None or st.status != "joined" or st.last_seen < silent:
                    rnd.left.add(c)   # a dropout: gone quiet or left
            if not rnd.pending() and not rnd.receiving:
                reason = "all sampled clients replied" if len(rnd.replies) == len(sampled) else "remaining clients dropped"
                break
            if now >= rnd.deadline:
                reason = "deadline"
                break
            await self._wait_change(min(rnd.deadline - now, 0.5))
        rnd.closing = True
        while rnd.receiving:        # let uploads already being validated finish (they will be refused)
            await self._wait_change(0.05)
        # Shielded: a shutdown that cancels the driver still lets a started commit finish.
        self.closing_task = asyncio.ensure_future(self._close_round(rnd, reason))
        await asyncio.shield(self.closing_task)

    async def _close_round(self, rnd: OpenRound, reason: str) -> None:
        s = self.settings
        t0 = time.perf_counter()
        ok = len(rnd.replies) >= s.min_replies
        new_state = None
        importance, data, sha, codec_out = None, None, None, None
        if ok:
            try:
                new_state, importance, data, sha, codec_out = await asyncio.to_thread(self._aggregate, rnd)
            except Exception as e:  # a faulty aggregator fails the round, not the coordinator
                log.exception("aggregation of round %d failed", rnd.id)
                ok, reason = False, f"aggregation failed: {type(e).__name__}: {e}"
        else:
            reason = f"{reason}: {len(rnd.replies)} replies < min_replies {s.min_replies}"
        agg_s = time.perf_counter() - t0
        if ok and codec_out is not None:      # updates the defence refused are rejections, not replies
            for c, why in codec_out[3].items():
                rnd.replies.pop(c, None)
                rnd.rejected[c] = f"INVALID_ARGUMENT: refused by the defence: {why}"
        records = []
        for c in rnd.sampled:
            if c in rnd.replies:
                r = rnd.replies[c]
                records.append(ClientRoundRecord(c, "replied", r.bytes_up, rnd.bytes_down.get(c, 0),
                                                 r.metrics.get("loss", r.metrics.get("train_loss")), r.num_examples,
                                                 None, r.metrics))
            elif c in rnd.rejected:
                records.append(ClientRoundRecord(c, "rejected", 0, rnd.bytes_down.get(c, 0),
                                                 rejection_reason=rnd.rejected[c]))
            else:
                records.append(ClientRoundRecord(c, "dropped", 0, rnd.bytes_down.get(c, 0)))

        def wmean(key):
            pairs = [(r.metrics[key], r.num_examples) for r in rnd.replies.values() if key in r.metrics]
            n = sum(w for _, w in pairs)
            return sum(v * w for v, w in pairs) / n if n else None
        new_version = self.version + 1 if ok else self.version
        rec = RoundRecord(
            id=rnd.id, status="committed" if ok else "failed", model_version=new_version, base_version=rnd.base_version,
            started_at=rnd.started_at, ended_at=time.time(), sampled=len(rnd.sampled), replied=len(rnd.replies),
            dropped=sum(1 for r in records if r.status == "dropped"), rejected=sum(1 for r in records if r.status == "rejected"),
            train_loss=wmean("loss") if wmean("loss") is not None else wmean("train_loss"), val_loss=wmean("val_loss"),
            bytes_up=sum(r.bytes_up for r in rnd.replies.values()), bytes_down=sum(rnd.bytes_down.values()),
            fedavg_fp32_bytes=len(rnd.replies) * self.spec.num_elements() * 4, aggregation_s=agg_s, reason=reason)
        seen = {n: c.last_seen for n, c in self.clients.items()}
        # The file on a worker thread; the SQLite transaction here, on the loop thread
        # that owns the connection (so no other call can interleave with it).
        path = await asyncio.to_thread(self.store.write_checkpoint, new_version, data) if ok else None
        codec_file = downlink = None
        if ok and codec_out is not None:
            downlink, codec_bytes, new_shared, _ = codec_out
            codec_file = (await asyncio.to_thread(self.store.write_codec_state, new_version, codec_bytes),
                          sha256_hex(codec_bytes))
        mask = rnd.active_heads.to(torch.int64).tolist()
        meta = None
        if ok and self.accountant is not None:
            self.accountant.record_round(rnd.dp_rate)
            meta = {"privacy": json.dumps(self.privacy_summary())}
        self.store.record_round(rec, records, importance, (path, sha) if ok else None, seen, s.keep_checkpoints,
                                mask=mask, codec=codec_file, downlink=downlink, keep_downlinks=s.keep_downlinks,
                                meta=meta)
        if ok:
            self.state, self.model_bytes, self.model_sha, self.version = new_state, data, sha, new_version
            self._delta_cache.clear()
            if downlink is not None:
                self.shared = new_shared
                self._downlinks[new_version] = downlink
                for v in [v for v in self._downlinks if v <= new_version - s.keep_downlinks]:
                    del self._downlinks[v]
            if importance is not None:
                self.importance = torch.tensor(importance, dtype=torch.float32)
        self.metrics.aggregation_seconds.observe(time.perf_counter() - t0)
        self.metrics.rounds.labels(rec.status).inc()
        self.metrics.model_version.set(self.version)
        shutil.rmtree(self.spool_root / f"round-{rnd.id:06d}", ignore_errors=True)
        self.next_round_id = rnd.id + 1
        self.round = None
        log.info("round %d %s (%s): %d/%d replied, version %d %s", rnd.id, rec.status, reason, rec.replied,
                 rec.sampled, self.version, self.model_sha[:12])
        self._changed.set()

    def _aggregate(self, rnd: OpenRound):
        """Decode the spooled updates in client-id order into the aggregator (a worker thread).

        Returns (new state, round importance (L, H) list or None, checkpoint bytes, sha256,
        codec output (downlink bytes, codec state bytes) or None)."""
        if self.codec is not None:
            return self._aggregate_codec(rnd)
        ctx = RoundContext(round_id=rnd.id, model_version=rnd.base_version, head_blocks=self.spec.head_blocks,
                           active_heads=rnd.active_heads, codec=dict(self.settings.codec_extra),
                           server_lr=self.settings.server_lr)
        self.aggregator.begin_round(self.state, ctx)
        limits = self.limits(rnd)
        imp_sum, imp_w = None, 0
        for client in sorted(rnd.replies):
            reply = rnd.replies[client]
            msg = pb.ModelUpdate.FromString(reply.path.read_bytes())
            update = decode_update(msg, self.spec, limits)
            del msg
            if update.importance is not None:
                w = float(update.num_examples)
                imp_sum = update.importance.double() * w if imp_sum is None else imp_sum + update.importance.double() * w
                imp_w += w
            self.aggregator.add(client, update, update.num_examples)
            del update
        new_state = self.aggregator.finish()
        missing = set(self.state) - set(new_state)
        if missing:
            raise RuntimeError(f"aggregator returned no value for {sorted(missing)[:5]}")
        new_state = {k: new_state[k].detach().to("cpu", torch.float32).contiguous() for k in self.state}
        importance = (imp_sum / imp_w).float().tolist() if imp_sum is not None else None
        data = canonical_bytes(new_state)
        return new_state, importance, data, sha256_hex(data), None

    def _codec_aggregator(self, plan, rnd: OpenRound):
        from .defenses import DPAggregator, RobustAggregator
        s, c = self.settings, self.codec
        if s.dp is not None:
            agg = DPAggregator(c.shapes, c.num_layers, c.num_heads, s.dp, expected_clients=len(rnd.sampled),
                               seed=s.seed)
        else:
            agg = RobustAggregator(c.shapes, c.num_layers, c.num_heads, s.defense)
        agg.begin_round(c.global_state, plan)
        return agg

    def privacy_summary(self, exhausted: bool = False) -> dict | None:
        acc = self.accountant
        if acc is None:
            return None
        dp = self.settings.dp
        return dict(epsilon=acc.epsilon(), delta=dp.delta, target_epsilon=dp.target_epsilon, rounds=acc.rounds,
                    noise_multiplier=dp.noise_multiplier, clip_norm=dp.clip_norm, exhausted=exhausted,
                    history=acc.history)

    def _aggregate_codec(self, rnd: OpenRound):
        """Exact aggregation, outer step and downlink. The codec's state changes only if
        all of it succeeds (on an error it is put back as it was)."""
        plan = rnd.plan
        snapshot = self.codec.state_dict()
        try:
            agg = self._codec_aggregator(plan, rnd)
            for client in sorted(rnd.replies):
                msg = pb.ModelUpdate.FromString(rnd.replies[client].path.read_bytes())
                update = self._decode(msg, rnd)
                del msg
                agg.add(client, update, update.num_examples)
            aggregate = agg.finish()
            importance = agg.importance()
            refused = dict(agg.rejected)
            if len(rnd.replies) - len(refused) < self.settings.min_replies:
                raise ValueError(f"{len(refused)} update(s) refused by the defence ({'; '.join(refused.values())}), "
                                 f"leaving fewer than min_replies {self.settings.min_replies}")
            down = self.codec.finish_round(plan, aggregate, importance)
            new_state = {k: self.codec.global_state[k].detach().to("cpu", torch.float32).contiguous().clone()
                         for k in self.state}
            data = canonical_bytes(new_state)
            codec_bytes = canonical_bytes(self.codec.state_dict())
        except BaseException:
            self.codec.load_state_dict(snapshot)
            raise
        imp = importance.float().tolist() if importance is not None else None
        return new_state, imp, data, sha256_hex(data), (down.SerializeToString(), codec_bytes, self.codec.shared,
                                                        refused)
