"""The gRPC worker: join, then loop get_task -> download -> train -> submit until the run ends.

Today's coordinator aggregates plain FedAvg and serves the full model or the changed
tensors, so this worker uploads dense float32 deltas (local - global) restricted to
nothing the coordinator would refuse. (The codec path — ``ClientCodec`` uplink and the
coordinator's downlink ModelUpdate — is not wired into the coordinator yet.)

Restart safety: the state directory holds ``worker.json`` (last submitted round, the
model version it trained from), written atomically. A restarted worker never trains a
round it already submitted; a replay the coordinator refuses with ALREADY_EXISTS
counts as done. When the coordinator is away the worker retries with exponential
backoff and jitter; FINISHED ends the loop with exit code 0.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from protos.fedmla.v1 import coordinator_pb2 as cpb
from protos.fedmla.v1 import types_pb2 as pb
from protos.tensors import encode_tensor

from .data import ClientData, DataError
from .transport import CoordinatorClient, TLSConfig

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}


def atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dense_update(global_state: dict[str, torch.Tensor], local_state: dict[str, torch.Tensor],
                 importance: torch.Tensor | None, num_examples: int, metrics: dict[str, float]) -> pb.ModelUpdate:
    """A FedAvg fp32 ModelUpdate: every parameter's delta, dense."""
    msg = pb.ModelUpdate(dense=[pb.DenseUpdate(name=n, value=encode_tensor((local_state[n].float()
                                                                          - global_state[n].float()).contiguous()))
                                for n in sorted(global_state)],
                         num_examples=int(num_examples), metrics={k: float(v) for k, v in metrics.items()})
    if importance is not None:
        L, H = importance.shape
        msg.importance.CopyFrom(pb.HeadScores(num_layers=L, num_heads=H,
                                              scores=[float(v) for v in importance.flatten().tolist()]))
    return msg


@dataclass
class WorkerOptions:
    target: str
    token: str
    state_dir: Path
    tls: TLSConfig | None = None
    max_backoff_s: float = 30.0
    give_up_after_s: float = 600.0     # coordinator unreachable this long -> exit 1
    log: callable = print


class Worker:
    def __init__(self, opts: WorkerOptions, data: ClientData):
        self.opts, self.data = opts, data
        self.state_dir = Path(opts.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.meta_path = self.state_dir / "worker.json"
        self.meta = json.loads(self.meta_path.read_text()) if self.meta_path.exists() else {}
        self.client = CoordinatorClient(opts.target, opts.token, tls=opts.tls, timeout=60)
        self.global_state: dict | None = None
        self.version: int | None = None
        self.trainers: dict = {}
        self._hb_stop = threading.Event()
        self._round = 0
        self.rounds_done = 0
        self.bytes_up = self.bytes_down = 0
        self.fedavg_up = self.fedavg_down = 0     # what FedAvg fp32 sends: dense deltas up, full model down

    # ---- helpers ---------------------------------------------------------------------
    def _save_meta(self) -> None:
        atomic_write_json(self.meta_path, self.meta)

    def _call(self, fn, *a, **kw):
        """Call with exponential backoff + jitter while the coordinator is unavailable."""
        delay, start = 0.5, time.monotonic()
        while True:
            try:
                return fn(*a, **kw)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or time.monotonic() - start > self.opts.give_up_after_s:
                    raise
                self.opts.log(f"coordinator unavailable ({e.code().name}); retrying in {delay:.1f}s")
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.opts.max_backoff_s)

    def _heartbeat_loop(self, interval: float) -> None:
        while not self._hb_stop.wait(interval):
            try:
                self.client.heartbeat(round_id=self._round, state="training" if self._round else "idle")
            except grpc.RpcError:
                pass

    def _trainer(self, model_cfg_json: str, hyper: pb.HyperParameters, seed: int):
        from mla_model import MLAConfig

        from .trainer import LocalTrainer, TrainerConfig
        key = (model_cfg_json, hyper.local_steps, hyper.learning_rate, hyper.batch_size, hyper.seq_len)
        if key not in self.trainers:
            cfg = TrainerConfig(local_steps=hyper.local_steps, lr=hyper.learning_rate, batch_size=hyper.batch_size,
                                seq_len=hyper.seq_len, seed=seed)
            self.trainers = {key: LocalTrainer(MLAConfig.model_validate_json(model_cfg_json), cfg)}
        return self.trainers[key]

    def _sync(self, model: pb.ModelVersion) -> None:
        if self.version == model.version and self.global_state is not None:
            return
        from .transport import ModelIntegrityError, apply_download
        dl = self._call(self.client.download, self.version if self.global_state is not None else None)
        self.bytes_down += len(dl.data)
        try:
            state = apply_download(dl, self.global_state)
        except ModelIntegrityError:
            if dl.kind != cpb.DownloadModelResponse.DELTA:
                raise
            dl = self._call(self.client.download, None)     # resync from the full model
            self.bytes_down += len(dl.data)
            state = apply_download(dl)
        self.global_state, self.version = state, dl.model.version
        self.fedavg_down += 4 * sum(t.numel() for t in state.values())

    # ---- main loop -------------------------------------------------------------------
    def run(self) -> int:
        joined = self._call(self.client.join, num_examples=self.data.num_train_tokens, device="cpu")
        self.opts.log(f"joined {self.opts.target} as {joined.client_id} (run {joined.run_id})")
        hb = threading.Thread(target=self._heartbeat_loop, args=(max(joined.heartbeat_interval_s, 0.5),), daemon=True)
        hb.start()
        try:
            while True:
                reply = self._call(self.client.get_task)
                if reply.status == cpb.GetTaskResponse.FINISHED:
                    try:      # end holding the final global model (verified against its hash)
                        self._sync(reply.model)
                    except grpc.RpcError as e:
                        self.opts.log(f"could not download the final model: {e.code().name}")
                    self.opts.log(f"run finished after round {reply.current_round}; {self.rounds_done} round(s) here")
                    try:
                        self.client.leave("run finished")
                    except grpc.RpcError:
                        pass
                    return 0
                if reply.status != cpb.GetTaskResponse.READY:
                    time.sleep(max(min(reply.retry_after_s, 5.0), 0.2))
                    continue
                task = reply.task
                if self.meta.get("last_round", -1) >= task.round_id:
                    time.sleep(max(min(reply.retry_after_s, 2.0), 0.2))   # already submitted this round
                    continue
                self._do_round(task)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED or e.code() == grpc.StatusCode.PERMISSION_DENIED:
                self.opts.log(f"error: the coordinator refused this worker's token: {e.details()}")
                return 2
            raise
        finally:
            self._hb_stop.set()
            hb.join(timeout=70)      # never close the channel under a heartbeat in flight
            self.client.close()

    def _do_round(self, task: pb.Task) -> None:
        self._round = task.round_id
        self._sync(task.model)
        trainer = self._trainer(task.model_config_json, task.hyper, task.seed)
        self.opts.log(f"round {task.round_id}: training {task.hyper.local_steps} steps from v{self.version}")
        res = trainer.train(self.global_state, self.data, round_idx=task.round_id, client_key=self.data.name)
        msg = dense_update(self.global_state, res.state, res.importance, res.num_examples, res.metrics)
        try:
            self._call(self.client.submit, msg, task.round_id, task.model.version)
            self.bytes_up += msg.ByteSize()
            self.fedavg_up += 4 * sum(t.numel() for t in self.global_state.values())
            self.opts.log(f"round {task.round_id}: submitted {msg.ByteSize()} bytes, "
                          f"train loss {res.metrics['train_loss']:.4f}")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE):
                    self.opts.log(f"round {task.round_id}: update refused ({e.code().name}: {e.details()})")
                    self._round = 0
                    return
                raise
            self.opts.log(f"round {task.round_id}: already accepted earlier")
        self.meta.update(last_round=task.round_id, trained_from_version=task.model.version)
        self._save_meta()
        self.rounds_done += 1
        self._round = 0


def load_client_data(spec: str, client_index: int | None, name: str) -> ClientData:
    """``builtin`` (standard-library corpus, client ``client_index``) or a folder path."""
    from .data import load_folder, load_stdlib_corpus
    if spec == "builtin":
        data = load_stdlib_corpus()
    else:
        p = Path(spec)
        if not p.exists():
            raise DataError(f"data path {spec!r} (client {name!r}) does not exist")
        data = load_folder(p)
    if client_index is None:
        names = data.names
        if name in names:
            return data.client(name)
        client_index = 0
    if not 0 <= client_index < len(data.clients):
        raise DataError(f"--client-index {client_index} is out of range: {data.source} has "
                        f"{len(data.clients)} clients")
    return data.clients[client_index]


def register(app, bench) -> None:
    import typer

    @app.command("worker")
    def worker_cmd(
        coordinator: str = typer.Option(..., "--coordinator", help="HOST:PORT of the coordinator"),
        name: str = typer.Option(..., "--name", help="this worker's name (logs; selects a folder client)"),
        token: str = typer.Option(None, "--token", help="access token (or --token-file)"),
        token_file: Path = typer.Option(None, "--token-file", help="file holding the access token"),
        ca: Path = typer.Option(None, "--ca", help="CA certificate (PEM): use TLS"),
        cert: Path = typer.Option(None, "--cert", help="client certificate (mutual TLS)"),
        key: Path = typer.Option(None, "--key", help="client key (mutual TLS)"),
        state_dir: Path = typer.Option(..., "--state-dir", help="directory for the worker's restart state"),
        data: str = typer.Option("builtin", "--data", help="'builtin' or a folder of client data"),
        client_index: int = typer.Option(None, "--client-index", help="which client of the data to be"),
    ) -> None:
        """Take part in federated rounds until the coordinator's run is finished."""
        if (token is None) == (token_file is None):
            typer.echo("error: give exactly one of --token and --token-file", err=True)
            raise typer.Exit(2)
        if token_file is not None:
            try:
                token = token_file.read_text().strip()
            except OSError as e:
                typer.echo(f"error: cannot read --token-file {token_file}: {e.strerror}", err=True)
                raise typer.Exit(2)
        if (cert is None) != (key is None):
            typer.echo("error: --cert and --key go together", err=True)
            raise typer.Exit(2)
        tls = TLSConfig(root_ca=ca, cert=cert, key=key) if ca or cert else None
        try:
            client_data = load_client_data(data, client_index, name)
            w = Worker(WorkerOptions(coordinator, token, state_dir, tls=tls,
                                     log=lambda m: typer.echo(f"[{name}] {m}", err=True)), client_data)
            code = w.run()
        except DataError as e:
            typer.echo(f"error: bad data for worker {name!r}: {e}", err=True)
            raise typer.Exit(2)
        except grpc.RpcError as e:
            typer.echo(f"error: coordinator {coordinator}: {e.code().name}: {e.details()}", err=True)
            raise typer.Exit(1)
        raise typer.Exit(code)
