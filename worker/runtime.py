"""The gRPC worker: join, then loop get_task -> download -> train -> submit until the run ends.

Every task carries the codec config: the update is encoded by
:class:`~fedmla.protos.codec.ClientCodec` (active heads only, low-rank, quantised, with
this worker's error-feedback residual) and the global model arrives as codec downlinks
(``CODEC_CHAIN``) applied with the same code the coordinator runs, or as the full state
(``CODEC_FULL``); every result is checked against the model's SHA-256, and a mismatch
falls back to a full download. In a seeded run (``JoinResponse.seeded_init``) a worker
that holds nothing rebuilds version 0 from the seed and asks for the downlinks since
version 0, which are far smaller than the full state while the run is young.

Restart safety: the state directory holds

- ``pending.safetensors``: written *before* an update is sent (write-ahead): the
  serialized update, its round and model version, and the codec residual as it is once
  that update counts as sent;
- ``worker.json``: the last round the coordinator accepted, written after it did.

A restarted worker never trains a round it already encoded: when the coordinator offers
the round of the pending update again (the worker died before sending, or the
coordinator restarted and lost it) the saved bytes are sent again, so the coordinator
sees the same update and the residual stays consistent with what was sent. A refused
update restores the residual from before it. A replay the coordinator refuses with
ALREADY_EXISTS counts as done. When the coordinator is away the worker retries with
exponential backoff and jitter; FINISHED ends the loop with exit code 0.

The protocol is written once, in :class:`WorkerProtocol`, as generators that yield the
I/O they need (an RPC, a sleep, a download) and the CPU-heavy steps (training, applying
a download, encoding). :class:`Worker` performs them with blocking calls and a heartbeat
thread; :class:`fedmla.worker.virtual.AsyncWorker` with grpc.aio on an event loop shared by
many virtual clients, heavy steps on a thread pool.

The requests the protocol yields live in :mod:`fedmla.worker.requests`, the per-process
cache of pure results it consults in :mod:`fedmla.worker.cache`.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import types_pb2 as pb

from .cache import ComputeCache, bytes_digest, with_model_hash
from .data import ClientData
from .requests import Compute, Download, Rpc, Sleep, StartHeartbeat
from fedmla.protos.transport import CoordinatorClient, TLSConfig

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` at once; ``durable``: on disk (fsync) before it replaces."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: dict, durable: bool = True) -> None:
    atomic_write_bytes(path, json.dumps(obj).encode(), durable)


@dataclass
class WorkerOptions:
    target: str
    token: str
    state_dir: Path
    tls: TLSConfig | None = None
    max_backoff_s: float = 30.0
    give_up_after_s: float = 600.0     # coordinator unreachable this long -> exit 1
    log: callable = print
    # fsync the state files before they replace the old ones, and write the pending update
    # to disk at all (off for simulate's virtual clients, whose state dirs are a temporary
    # dir of a run that a crash ends anyway: their pending update stays in memory, where a
    # resend within the run finds it)
    durable: bool = True


# ---- the protocol, written once ------------------------------------------------------
# WorkerProtocol holds everything a worker decides and computes; its steps are generators
# that *yield* what they need done (an RPC, a sleep, a CPU-heavy computation) and get the
# result (or the RPC's error) sent back. Two thin drivers perform those requests: Worker
# (blocking calls, a heartbeat thread: the `fedmla worker` CLI) and AsyncWorker (grpc.aio
# on one event loop shared by many virtual clients, heavy work on an executor: simulate).


class WorkerProtocol:
    """The worker's state and protocol logic, with no I/O of its own (see the drivers)."""

    def __init__(self, opts: WorkerOptions, data: ClientData, cache: ComputeCache | None = None):
        self.opts, self.data = opts, data
        self.cache = cache                        # shared with the other virtual clients of this process
        self.state_dir = Path(opts.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.meta_path = self.state_dir / "worker.json"
        self.meta = json.loads(self.meta_path.read_text()) if self.meta_path.exists() else {}
        self.global_state: dict | None = None
        self.version: int | None = None
        self.model_sha: str | None = None         # SHA-256 of global_state (checked against the coordinator's)
        self.trainers: dict = {}
        self._trainer_key = self._batch_seed = None
        self._round = 0
        self.train_seconds = 0.0                  # CPU time inside the local trainer (its thread)
        self.rounds_done = 0                      # rounds whose update the coordinator took (this process)
        self._rounds: set[int] = set()
        self.bytes_up = self.bytes_down = 0
        self.fedavg_up = self.fedavg_down = 0     # what FedAvg fp32 sends: dense deltas up, full model down
        self.shared = None                        # codec runs: the codec's shared state at self.version
        self.codec = self.codec_tensors = None    # codec runs: ClientCodec (owns the residual), its TensorCodec
        self.codec_json: str | None = None
        self.model_cfg = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.seeded_init = None                   # cpb.SeededInit: version 0 is rebuilt here, not downloaded
        self._pending_mem: dict | None = None     # the pending record of a worker that is not durable

    # ---- helpers ---------------------------------------------------------------------
    def _save_meta(self) -> None:
        atomic_write_json(self.meta_path, self.meta, self.opts.durable)

    def _call(self, name: str, *a, **kw):
        """Call with exponential backoff + jitter while the coordinator is unavailable."""
        delay, start = 0.5, time.monotonic()
        while True:
            try:
                return (yield Rpc(name, a, kw or None))
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or time.monotonic() - start > self.opts.give_up_after_s:
                    raise
                self.opts.log(f"coordinator unavailable ({e.code().name}); retrying in {delay:.1f}s")
                yield Sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.opts.max_backoff_s)

    def _heartbeat_request(self) -> dict:
        return dict(round_id=self._round, state="training" if self._round else "idle")

    def _trainer(self, model_cfg_json: str, hyper: pb.HyperParameters, seed: int):
        """The local trainer for these hyper-parameters. Its batches are seeded with the
        seed of the first task this worker trained with them (kept while they stay)."""
        from fedmla.mla_model import MLAConfig

        from .trainer import LocalTrainer, TrainerConfig
        key = (model_cfg_json, hyper.local_steps, hyper.learning_rate, hyper.batch_size, hyper.seq_len)
        if self._trainer_key != key:
            self._trainer_key, self._batch_seed = key, seed

        def make():
            cfg = TrainerConfig(local_steps=hyper.local_steps, lr=hyper.learning_rate, batch_size=hyper.batch_size,
                                seq_len=hyper.seq_len, seed=seed)
            return LocalTrainer(MLAConfig.model_validate_json(model_cfg_json), cfg)
        if self.cache is not None:
            return self.cache.trainer(key, make)
        if key not in self.trainers:
            self.trainers = {key: make()}
        return self.trainers[key]

    def _memo(self, key, compute):
        """``compute()``, or the value the process's other clients computed for ``key``."""
        return compute() if self.cache is None else self.cache.get(key, compute)

    # ---- codec state -----------------------------------------------------------------
    def _codec_for(self, config_json: str):
        """The ClientCodec of this config (residual restored from the pending file)."""
        from fedmla.protos.codec import ClientCodec, CodecConfig
        from fedmla.protos.codec.wire import TensorCodec
        if self.codec is not None and self.codec_json == config_json:
            return self.codec
        cfg = CodecConfig.model_validate_json(config_json)
        shapes = {n: tuple(t.shape) for n, t in self.global_state.items()}
        self.codec = ClientCodec(self.model_cfg, cfg, shapes, self.data.name)
        self.codec_tensors = TensorCodec(self.model_cfg, cfg, shapes)
        self.codec_json = config_json
        pending = self._read_pending()
        if pending is not None and pending["config"] == config_json:
            self.codec.load_state_dict(pending["residual"])
        return self.codec

    def _read_pending(self) -> dict | None:
        """The write-ahead record of the last encoded update, or None."""
        if not self.opts.durable:
            return self._pending_mem
        from safetensors import safe_open
        path = self.state_dir / "pending.safetensors"
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return dict(round_id=int(meta["round_id"]), version=int(meta["version"]), config=meta.get("config", ""),
                        payload=tensors.pop("payload").numpy().tobytes() if "payload" in tensors else b"",
                        residual={k[len("residual/"):]: v for k, v in tensors.items() if k.startswith("residual/")})
        except Exception as e:  # our own file, damaged (e.g. a full disk): start over without it
            self.opts.log(f"ignoring unreadable {path}: {e}")
            return None

    def _write_pending(self, round_id: int, version: int, payload: bytes, config: str,
                       residual: dict[str, torch.Tensor]) -> None:
        if not self.opts.durable:
            # the record itself, not a file: nothing outlives this process (simulate)
            self._pending_mem = dict(round_id=round_id, version=version, config=config, payload=payload,
                                     residual={k: v.clone() for k, v in residual.items()})
            return
        from safetensors.torch import save
        tensors = {f"residual/{k}": v.contiguous() for k, v in residual.items()}
        tensors["payload"] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else \
            torch.zeros(0, dtype=torch.uint8)
        atomic_write_bytes(self.state_dir / "pending.safetensors",
                           save(tensors, metadata=dict(round_id=str(round_id), version=str(version), config=config)),
                           self.opts.durable)

    # ---- model sync --------------------------------------------------------------------
    def _apply(self, dl, config_json: str | None):
        """(state, shared) after a download; raises ModelIntegrityError on a hash mismatch."""
        from fedmla.protos.codec import UpdateDecodeError
        from fedmla.protos.codec.transfer import apply_chain, decode_full_state
        from fedmla.protos.weights import model_hash

        from fedmla.protos.transport import ModelIntegrityError
        kinds = cpb.DownloadModelResponse
        try:
            if dl.kind == kinds.DELTA:          # nothing to download: this worker is current
                if dl.base_version != dl.model.version or self.version != dl.model.version:
                    raise ModelIntegrityError(f"empty delta for version {dl.model.version}, this worker holds "
                                              f"{self.version}")
                state, shared, digest = self.global_state, self.shared, model_hash(self.global_state)
            elif dl.kind == kinds.CODEC_FULL:
                shapes = {n: tuple(s) for n, s in self.shapes.items()}
                state, shared, digest = self._memo(("full", bytes_digest(dl.data)),
                                                   lambda: with_model_hash(*decode_full_state(dl.data, shapes)))
            elif dl.kind == kinds.CODEC_CHAIN:
                if self.shared is None or self.global_state is None or config_json is None:
                    raise ModelIntegrityError("a codec chain needs this worker's codec state; download the full state")
                chain = cpb.CodecDownlinks.FromString(dl.data)
                if chain.base_version != self.version or self.shared.round != self.version:
                    raise ModelIntegrityError(f"chain starts at version {chain.base_version}, this worker holds "
                                              f"{self.version} (codec round {self.shared.round})")
                self._codec_for(config_json)

                def apply():
                    return with_model_hash(*apply_chain(self.global_state, self.shared, list(chain.downlinks),
                                                self.codec_tensors))
                # What the chain gives depends on the bytes and on the version it starts from
                # (this worker's, verified by its hash), nothing else.
                key = ("chain", self.version, self.model_sha, config_json, bytes_digest(dl.data))
                state, shared, digest = self._memo(key, apply) if self.model_sha else apply()
            else:
                raise ModelIntegrityError(f"unknown download kind {dl.kind}")
        except UpdateDecodeError as e:
            raise ModelIntegrityError(f"download does not decode: {e}") from None
        except Exception as e:     # protobuf DecodeError of a damaged chain
            if isinstance(e, ModelIntegrityError):
                raise
            raise ModelIntegrityError(f"download does not decode: {type(e).__name__}: {e}") from None
        if digest != dl.model.sha256:
            raise ModelIntegrityError(f"reconstructed weights hash to {digest[:12]}, the coordinator's version "
                                      f"{dl.model.version} is {dl.model.sha256[:12]}: download the full model")
        return state, shared

    def _rebuild_initial(self, config_json: str | None) -> bool:
        """A worker that holds nothing in a seeded run rebuilds version 0 from the run's seed
        (no bytes) and then needs only the codec downlinks since version 0. False (download
        the full state instead) when the run is not seeded or the rebuild does not hash to
        version 0 (e.g. another torch draws other initial weights)."""
        if self.seeded_init is None or not config_json:
            return False
        from fedmla.mla_model import init_global_state
        from fedmla.protos.codec import CodecConfig, SharedState
        from fedmla.protos.weights import model_hash
        seed = self.seeded_init.seed

        def build():
            state = init_global_state(self.model_cfg, seed)
            return state, model_hash(state)
        state, digest = self._memo(("init", self.model_cfg.model_dump_json(), seed), build)
        if digest != self.seeded_init.sha256:
            self.opts.log("the seeded initial model does not match version 0 here; downloading the full state")
            self.seeded_init = None
            return False
        shapes = {n: tuple(t.shape) for n, t in state.items()}
        self.global_state, self.version, self.model_sha = state, 0, digest
        self.shared = SharedState.initial(shapes, CodecConfig.model_validate_json(config_json))
        return True

    def _fetch(self, since: int | None):
        dl = yield Download(since)
        self.bytes_down += len(dl.data)
        return dl

    def _sync(self, model: pb.ModelVersion, config_json: str | None = None):
        if self.version == model.version and self.global_state is not None and self.shared is not None:
            return
        from fedmla.protos.transport import ModelIntegrityError
        have = self.global_state is not None and self.shared is not None
        if not have and (yield Compute(self._rebuild_initial, (config_json,))):
            have = True
            if model.version == 0:
                self.fedavg_down += 4 * sum(t.numel() for t in self.global_state.values())
                return
        dl = yield from self._fetch(self.version if have else None)
        try:
            state, shared = yield Compute(self._apply, (dl, config_json))
        except ModelIntegrityError as e:
            if dl.kind in (cpb.DownloadModelResponse.FULL, cpb.DownloadModelResponse.CODEC_FULL):
                raise
            self.opts.log(f"resyncing from the full model ({e})")
            dl = yield from self._fetch(None)      # resync from the full model
            state, shared = yield Compute(self._apply, (dl, config_json))
        self.global_state, self.shared, self.version, self.model_sha = state, shared, dl.model.version, dl.model.sha256
        self.fedavg_down += 4 * sum(t.numel() for t in state.values())

    # ---- main loop -------------------------------------------------------------------
    def _session(self):
        """join, then get_task -> sync -> train -> submit until FINISHED; the exit code."""
        joined = yield from self._call("join", num_examples=self.data.num_train_tokens, device="cpu")
        self.opts.log(f"joined {self.opts.target} as {joined.client_id} (run {joined.run_id})")
        from fedmla.protos.spec import ModelSpec
        from fedmla.mla_model import MLAConfig
        self.model_cfg = MLAConfig.model_validate_json(joined.model_config_json)
        self.shapes = ModelSpec.from_config(self.model_cfg).shapes
        self.seeded_init = joined.seeded_init if joined.HasField("seeded_init") else None
        yield StartHeartbeat(max(joined.heartbeat_interval_s, 0.5))
        try:
            while True:
                reply = yield from self._call("get_task")
                if reply.status == cpb.GetTaskResponse.FINISHED:
                    # Hold the final model (a worker that trained has its state, verified
                    # against its hash; a codec chain is cheap). One that never did has nothing to sync.
                    if self.global_state is not None or self._rounds:
                        try:
                            yield from self._sync(reply.model, self.codec_json)
                        except grpc.RpcError as e:
                            self.opts.log(f"could not download the final model: {e.code().name}")
                    self.opts.log(f"run finished after round {reply.current_round}; {self.rounds_done} round(s) here")
                    try:
                        yield Rpc("leave", ("run finished",))
                    except grpc.RpcError:
                        pass
                    return 0
                if reply.status != cpb.GetTaskResponse.READY:
                    yield Sleep(max(min(reply.retry_after_s, 5.0), 0.2))
                    continue
                task = reply.task
                pending = self._read_pending()
                if (pending is not None and pending["payload"] and pending["round_id"] == task.round_id
                        and pending["version"] == task.model.version):
                    yield from self._send(task, pending["payload"], None, resent=True)   # encoded before; same bytes
                    continue
                if self.meta.get("last_round", -1) >= task.round_id:
                    yield Sleep(max(min(reply.retry_after_s, 2.0), 0.2))   # already submitted this round
                    continue
                yield from self._do_round(task)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED or e.code() == grpc.StatusCode.PERMISSION_DENIED:
                self.opts.log(f"error: the coordinator refused this worker's token: {e.details()}")
                return 2
            raise

    def _train(self, task: pb.Task):
        # The trainer is taken in the thread that trains with it: with a shared cache a
        # trainer belongs to one compute thread, and two threads training one model crash.
        trainer = self._trainer(task.model_config_json, task.hyper, task.seed)
        t0 = time.thread_time()     # CPU time of the thread that trains: many virtual clients share a process
        res = trainer.train(self.global_state, self.data, round_idx=task.round_id, client_key=self.data.name,
                            seed=self._batch_seed)
        self.train_seconds += time.thread_time() - t0
        return res

    def _encode(self, task: pb.Task, res, config_json: str):
        """The update's bytes, written ahead to the pending file; (payload, residual before it)."""
        from fedmla.protos.codec.transfer import task_plan
        metrics = {k: float(v) for k, v in res.metrics.items()}
        codec = self._codec_for(config_json)
        if self.shared.round != self.version:
            raise RuntimeError(f"codec state is at round {self.shared.round} but the model at version "
                               f"{self.version}; this is a bug")
        plan = task_plan(task, self.shared, codec.cfg)
        old_residual = codec.state_dict()
        msg = codec.encode(self.global_state, res.state, plan, res.importance, res.num_examples, metrics)
        payload = msg.SerializeToString()
        # Write-ahead: once this is on disk, this round's update is these bytes, whatever happens next.
        self._write_pending(task.round_id, task.model.version, payload, self.codec_json or "",
                            self.codec.state_dict())
        return payload, old_residual

    def _do_round(self, task: pb.Task):
        self._round = task.round_id
        config_json = task.codec.config_json
        if not config_json:
            raise RuntimeError(f"round {task.round_id}: the task carries no codec config (a coordinator older than "
                               f"this worker?); update the coordinator")
        yield from self._sync(task.model, config_json)
        self.opts.log(f"round {task.round_id}: training {task.hyper.local_steps} steps from v{self.version}")
        res = yield Compute(self._train, (task,))
        payload, old_residual = yield Compute(self._encode, (task, res, config_json))
        yield from self._send(task, payload, old_residual, train_loss=res.metrics.get("train_loss"))

    def _send(self, task: pb.Task, payload: bytes, old_residual: dict | None, resent: bool = False,
              train_loss: float | None = None):
        self._round = task.round_id
        what = "re-sent the saved update" if resent else "submitted"
        try:
            yield from self._call("submit", payload, task.round_id, task.model.version)
            self.bytes_up += len(payload)
            self.fedavg_up += 4 * sum(math.prod(s) for s in self.shapes.values())
            loss = f", train loss {train_loss:.4f}" if train_loss is not None else ""
            self.opts.log(f"round {task.round_id}: {what} {len(payload)} bytes{loss}")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE):
                    self.opts.log(f"round {task.round_id}: update refused ({e.code().name}: {e.details()})")
                    # Nothing was taken: the residual goes back to before this update.
                    if self.codec is not None and old_residual is not None:
                        self.codec.load_state_dict(old_residual)
                    self._write_pending(task.round_id, task.model.version, b"", self.codec_json or "",
                                        self.codec.state_dict() if self.codec is not None else {})
                    self._round = 0
                    return
                raise
            self.opts.log(f"round {task.round_id}: already accepted earlier")
        self.meta.update(last_round=task.round_id, trained_from_version=task.model.version)
        yield Compute(self._save_meta)      # an fsync: off the event loop of the async driver
        self._rounds.add(task.round_id)
        self.rounds_done = len(self._rounds)
        self._round = 0


class Worker(WorkerProtocol):
    """The blocking driver (``fedmla worker``): one gRPC channel, a heartbeat thread."""

    def __init__(self, opts: WorkerOptions, data: ClientData):
        super().__init__(opts, data)
        self.client = CoordinatorClient(opts.target, opts.token, tls=opts.tls, timeout=60)
        self._hb_stop = threading.Event()
        self._hb: threading.Thread | None = None

    def _drive(self, steps):
        """Run a protocol generator to its end, performing what it yields."""
        try:
            request = next(steps)
            while True:
                try:
                    result = self._perform(request)
                except Exception as e:
                    request = steps.throw(e)
                else:
                    request = steps.send(result)
        except StopIteration as stop:
            return stop.value

    def _perform(self, request):
        if isinstance(request, Rpc):
            return getattr(self.client, request.name)(*request.args, **(request.kwargs or {}))
        if isinstance(request, Compute):
            return request.fn(*request.args)
        if isinstance(request, Sleep):
            time.sleep(request.seconds)
            return None
        if isinstance(request, Download):
            return self._download(request.since)
        if isinstance(request, StartHeartbeat):
            self._hb = threading.Thread(target=self._heartbeat_loop, args=(request.interval,), daemon=True)
            self._hb.start()
            return None
        raise TypeError(f"unknown request {request!r}")

    def _download(self, since: int | None):
        return self._drive(self._call("download", since))

    def _heartbeat_loop(self, interval: float) -> None:
        while not self._hb_stop.wait(interval):
            try:
                self.client.heartbeat(**self._heartbeat_request())
            except grpc.RpcError:
                pass

    def run(self) -> int:
        try:
            return self._drive(self._session())
        finally:
            self._hb_stop.set()
            if self._hb is not None:
                self._hb.join(timeout=70)      # never close the channel under a heartbeat in flight
            self.client.close()
