"""The coordinator's state and round state machine, independent of gRPC.

:class:`Coordinator` holds the global model, the codec's state and the open round; its
handler methods (``join``, ``get_task``, ``download``, ``submit``, ``heartbeat``,
``leave``) take the authenticated client name and protocol messages and raise
:mod:`fedmla.coordinator.errors` on refusal. The gRPC servicers in
:mod:`fedmla.coordinator.server` are thin wrappers around them. Its parts:
:mod:`.registry` (clients), :mod:`.downloads` (what a worker downloads),
:mod:`.ingest` (upload streams), :mod:`.commit` (closing a round: aggregate, outer step,
commit), and here the state and the round driver.

Round life cycle (driven by :meth:`Coordinator.run`)::

    WAITING  until `clients_to_start` clients are active (seen within client_timeout_s)
    OPEN     `clients_per_round` clients sampled (seeded, from the sorted active names);
             the round's codec plan (active-head mask, shared bases) goes out with each
             task; one update per sampled client for (round_id, base model version)
    CLOSING  when every sampled client replied or left, or the deadline passed;
             later submissions are refused (FAILED_PRECONDITION)
    commit   >= min_replies: the spooled updates are decoded and summed by the round's
             aggregator in client-id order (the codec's exact mean unless a defence or DP
             is configured), the outer optimiser steps, the codec produces the downlink
             and applies it to the coordinator's own copy; the new model, the codec's
             whole state and the downlink are committed atomically; otherwise the round
             is recorded as failed and the model stays
    -> next round (round ids always increase; model version = committed rounds)

There is one update pipeline: plain FedAvg and DiLoCo are configurations of the codec
(``CodecConfig.fedavg()`` / ``.diloco()``: fp32 dense both ways, all heads).

Accepted updates are spooled to ``STORE/spool/round-N/`` while the round is open, so
that memory stays O(model) whatever the number of clients and the aggregation order
does not depend on arrival order. A restarted coordinator discards the spool of the
interrupted round and re-opens that round id from the last committed model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from fedmla.protos.codec import DecodeLimits, RoundPlan, ServerCodec
from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.seeds import derive_seed
from fedmla.protos.limits import clip_status
from fedmla.protos.spec import ModelSpec
from fedmla.protos.weights import canonical_bytes, load_safetensors_bytes, model_hash, sha256_hex

from .downloads import DownloadService
from .errors import CoordinatorError, StoreError
from .commit import RoundCloser
from .ingest import Reply, UploadIngest
from .metrics import CoordinatorMetrics
from .registry import ClientRegistry, sample_round
from .settings import CoordinatorSettings
from .store import Store

log = logging.getLogger("fedmla.coordinator")


@dataclass
class OpenRound:
    id: int
    base_version: int
    started_at: float
    deadline: float
    sampled: list[str]
    plan: RoundPlan                       # the round's codec plan (mask, shared bases)
    replies: dict[str, Reply] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    left: set[str] = field(default_factory=set)
    receiving: set[str] = field(default_factory=set)
    bytes_down: dict[str, int] = field(default_factory=dict)
    closing: bool = False
    dp_rate: float | None = None         # DP runs: the sampling rate the accountant charges for this round
    aggregator: object | None = None     # sums accepted updates as they arrive (see _make_aggregator)
    upload_limits: tuple[int, int] | None = None   # (largest update bytes, decoded elements) its plan allows

    @property
    def active_heads(self) -> torch.Tensor:
        """(L, H) bool: the heads whose rows/columns workers send this round."""
        return self.plan.mask

    def pending(self) -> list[str]:
        return [c for c in self.sampled if c not in self.replies and c not in self.left]


class Coordinator:
    def __init__(self, settings: CoordinatorSettings, store: Store | None = None,
                 metrics: CoordinatorMetrics | None = None):
        from .model_source import initial_model
        self.settings = settings
        self.metrics = metrics or CoordinatorMetrics()
        self.store = store or Store(settings.store)
        self.cfg, initial_state, self.tokenizer_json = initial_model(settings, self.store)
        self.spec = ModelSpec.from_config(self.cfg)
        self.config_json = self.cfg.model_dump_json()
        self._refuse_retired_store()
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
        self.version, self.model_sha = rec.version, rec.sha256
        del data
        self.seeded_init = self._seeded_init()
        self.codec = self._load_codec(rec)
        # The codec's shared state at self.version (the codec's own moves ahead during a commit).
        self.shared = self.codec.shared
        self._codec_json = settings.codec.model_dump_json()
        self.accountant = None
        if settings.dp is not None:
            from .privacy import PrivacyAccountant
            saved = self.store.meta("privacy")
            self.accountant = PrivacyAccountant(settings.dp, json.loads(saved)["history"] if saved else None)
        self.stop_reason: str | None = None
        self.next_round_id = self.store.last_round_id() + 1
        self._changed = asyncio.Event()
        self._task_event = asyncio.Event()     # set (and replaced) when a round opens or the run ends
        self.registry = ClientRegistry(self.store, settings, self.metrics, self.changed)
        self.downloads = DownloadService(self.store, settings.keep_downlinks)
        self.ingest = UploadIngest(self)
        self.closer = RoundCloser(self)
        self.round: OpenRound | None = None
        self.closing_task: asyncio.Future | None = None
        self.finished = False
        # Held GetTask calls already waited server-side, so the client may ask again soon.
        self._wait_retry_s = 0.1 if settings.task_long_poll_s > 0 else 0.5
        self.spool_root = self.store.root / "spool"
        shutil.rmtree(self.spool_root, ignore_errors=True)  # updates of an interrupted round
        self.metrics.model_version.set(self.version)
        log.info("store %s run %s: model version %d (%s), next round %d", self.store.root, self.store.run_id,
                 self.version, self.model_sha[:12], self.next_round_id)

    # ---- state ---------------------------------------------------------------------
    @property
    def clients(self):
        return self.registry.clients

    def _refuse_retired_store(self) -> None:
        """A store written by the retired dense update mode cannot be continued by the codec."""
        saved = self.store.meta("run_config")
        if saved is None:
            return
        old = json.loads(saved)
        if old.get("updates") == "dense":
            raise StoreError(f"store {self.store.root} was made by the retired dense update mode (updates='dense'); "
                             f"its rounds carry no codec state. Plain FedAvg is now the codec configuration "
                             f"--codec fedavg (DiLoCo: --codec diloco); start a new --store")

    def _load_codec(self, rec) -> ServerCodec:
        """The codec state at model version ``rec``: saved with it, or fresh for a new run."""
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
        s = self.settings
        codec = ServerCodec(self.cfg, cfg, self.state, limits=DecodeLimits(
            max_examples=s.max_num_examples, max_metrics=s.max_metrics, max_metric_name_chars=s.max_metric_name_chars))
        data = self.store.read_codec_state(rec)
        if data is None:
            if rec.version != 0:
                raise StoreError(f"store {self.store.root}: model version {rec.version} has no codec state "
                                 f"(written by the retired dense update mode?); start a new --store")
            return codec
        try:
            codec.load_state_dict(load_safetensors_bytes(data, None, f"codec state {rec.codec_path}"))
        except ValueError as e:
            raise StoreError(str(e)) from None
        if model_hash(codec.global_state) != rec.sha256 or codec.shared.round != rec.version:
            raise StoreError(f"codec state {rec.codec_path} does not belong to model version {rec.version} "
                             f"(weights or round differ); the store is damaged")
        return codec

    def changed(self) -> None:
        """Wake the round driver: something it waits on may have happened."""
        self._changed.set()

    def reject(self, err: CoordinatorError, client: str | None = None) -> CoordinatorError:
        """Count a refusal and, for a sampled client of the open round, remember why."""
        self.metrics.rejections.labels(err.reason).inc()
        rnd = self.round
        if client and rnd and client in rnd.sampled and client not in rnd.replies:
            rnd.rejected[client] = clip_status(f"{err.code}: {err.message}")     # stored: bounded
        return err

    def _known(self, client: str):
        try:
            return self.registry.known(client)
        except CoordinatorError as e:
            raise self.reject(e) from None

    def codec_settings(self) -> pb.CodecSettings:
        c = self.settings.codec
        return pb.CodecSettings(rank=c.rank, max_rank=c.max_rank, quant_bits=c.factor_bits,
                                keep_ratio=c.keep_ratio if c.head_selection else 1.0,
                                max_update_bytes=self.settings.max_update_bytes, config_json=self._codec_json)

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
            seed=derive_seed(s.seed, "task", rnd.id, client))

    def _seeded_init(self) -> cpb.SeededInit | None:
        """How a worker rebuilds version 0 without a download (a preset run), or None (a run
        started from a checkpoint: version 0 must be downloaded). The worker checks its rebuild
        against version 0's hash, so a seed that does not reproduce it costs a full download,
        never a wrong model."""
        from .model_source import stored_hf_config
        first = self.store.model(0)
        if first is None or stored_hf_config(self.store)[0] is not None:
            return None
        return cpb.SeededInit(seed=self.settings.init_seed, sha256=first.sha256)

    # ---- handlers -----------------------------------------------------------------
    def join(self, client: str, req: cpb.JoinRequest) -> cpb.JoinResponse:
        try:
            self.registry.join(client, req.capabilities)
        except CoordinatorError as e:
            raise self.reject(e) from None
        return cpb.JoinResponse(client_id=client, run_id=self.store.run_id,
                                heartbeat_interval_s=self.settings.heartbeat_interval_s,
                                model_config_json=self.config_json, model=self.model_version_msg(),
                                seeded_init=self.seeded_init)

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

    def hold_s(self, max_wait: float | None = None) -> float:
        """How long a WAIT answer may be held: ``task_long_poll_s``, at most the caller's
        deadline and at most half ``client_timeout_s``. The held call refreshes the client's
        last-seen time when it answers, and clients send no heartbeat while it is in flight,
        so the hold must end well inside the time after which a silent client counts as
        inactive."""
        hold = min(self.settings.task_long_poll_s, self.settings.client_timeout_s / 2)
        return hold if max_wait is None else min(hold, max_wait)

    async def wait_task(self, client: str, max_wait: float | None = None) -> cpb.GetTaskResponse:
        """:meth:`get_task`, but a WAIT answer is held up to ``task_long_poll_s`` (and at
        most ``max_wait``: the caller's deadline) until this client has something else to
        hear: a round that samples it, or the end of the run. Idle clients then cost one
        call per interval instead of a poll every half second."""
        reply = self.get_task(client)
        hold = self.hold_s(max_wait)
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
        since = req.since_version if req.HasField("since_version") else None
        kind, base, data, sha = self.downloads.payload(since, self.version, self.state, self.shared)
        self.metrics.bytes.labels("down").inc(len(data))
        if self.round is not None:
            self.round.bytes_down[client] = self.round.bytes_down.get(client, 0) + len(data)
        header = cpb.DownloadModelResponse.Header(kind=kind, model=self.model_version_msg(), base_version=base,
                                                  total_bytes=len(data), payload_sha256=sha)
        return header, data

    def heartbeat(self, client: str, req: cpb.HeartbeatRequest) -> cpb.HeartbeatResponse:
        rnd = self.round
        current = rnd.id if rnd else self.next_round_id
        if self.registry.seen(client) is None:
            return cpb.HeartbeatResponse(action=cpb.HeartbeatResponse.REJOIN, current_round=current,
                                         heartbeat_interval_s=self.settings.heartbeat_interval_s)
        stale = req.round_id != 0 and (rnd is None or rnd.closing or req.round_id != rnd.id)
        action = cpb.HeartbeatResponse.NEW_TASK if stale else cpb.HeartbeatResponse.CONTINUE
        return cpb.HeartbeatResponse(action=action, current_round=current,
                                     heartbeat_interval_s=self.settings.heartbeat_interval_s)

    def leave(self, client: str, req: cpb.LeaveRequest) -> cpb.LeaveResponse:
        try:
            self.registry.leave(client)
        except CoordinatorError as e:
            raise self.reject(e) from None
        if self.round is not None and client in self.round.sampled and client not in self.round.replies:
            self.round.left.add(client)
        return cpb.LeaveResponse()

    async def submit(self, client: str, requests: AsyncIterator) -> cpb.SubmitUpdateResponse:
        return await self.ingest.submit(client, requests)

    def upload_lost(self, client: str) -> None:
        """The client's connection died during its upload: recorded as dropped, not rejected."""
        rnd = self.round
        if rnd is not None and client not in rnd.replies:
            rnd.rejected.pop(client, None)

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
            active = self.registry.active(now)
            if len(active) < s.clients_to_start:
                await self._wait_change(0.25)
                continue
            await self._run_round(active)

    async def _run_round(self, active: list[str]) -> None:
        s = self.settings
        rid = self.next_round_id
        sampled = sample_round(s.seed, rid, active, s.clients_per_round)
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
        rnd = OpenRound(rid, self.version, now, now + s.round_timeout_s, sampled, self.codec.plan())
        rnd.aggregator = self.closer.make_aggregator(rnd)
        rnd.dp_rate = dp_rate
        self.round = rnd
        self.notify_tasks()
        self.metrics.current_round.set(rid)
        log.info("round %d open: %d sampled from %d active, base version %d", rid, len(sampled), len(active),
                 self.version)
        while True:
            now = time.time()
            for c in rnd.pending():
                if not self.registry.is_active(c, now):
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
        self.closing_task = asyncio.ensure_future(self.closer.close(rnd, reason))
        await asyncio.shield(self.closing_task)

    def privacy_summary(self, exhausted: bool = False) -> dict | None:
        acc = self.accountant
        if acc is None:
            return None
        dp = self.settings.dp
        return dict(epsilon=acc.epsilon(), delta=dp.delta, target_epsilon=dp.target_epsilon, rounds=acc.rounds,
                    noise_multiplier=dp.noise_multiplier, clip_norm=dp.clip_norm, exhausted=exhausted,
                    history=acc.history)
