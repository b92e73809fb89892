"""Typed configuration of a Flower run (fedmla strategy or Flower's own FedAvg) and the
helpers both apps share: the model/trainer/codec built from it and each node's data.

The ServerApp builds a :class:`FlowerConfig` from the run config (``[tool.flwr.app.config]``
in pyproject.toml, or ``flwr run . --run-config ...``) and sends it, as JSON, with every
message, so a ClientApp never depends on its own run config: server and clients always
use the same model, trainer and codec settings.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedmla.protos.codec import CodecConfig
from fedmla.mla_model import MLAConfig

from ..data import FederatedData, load_folder, load_stdlib_corpus, repartition
from ..trainer import TrainerConfig


class FlowerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["fedmla", "fedavg"] = "fedmla"
    rounds: int = Field(2, ge=1)
    num_nodes: int = Field(4, ge=1, description="virtual SuperNodes (run_flower_simulation only; flwr run "
                                                "takes it from the federation's num-supernodes)")
    clients_per_round: int | None = Field(None, ge=1, description="nodes sampled per round; None = all")
    preset: str = "tiny"
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    trainer: TrainerConfig = TrainerConfig(local_steps=10, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=10,
                                           total_steps=20)
    codec: CodecConfig = CodecConfig()
    data_dir: str | None = Field(None, description="folder of one subfolder per client; None = stdlib corpus")
    partition: Literal["iid", "dirichlet"] | None = Field(None, description=(
        "None: node i gets client i (iid repartition when there are more nodes than clients)"))
    alpha: float = 0.5
    max_bytes_per_client: int = 60_000
    eval_windows_per_client: int = 16
    client_eval_windows: int = Field(8, ge=0, description="windows of its own held-out tail a node evaluates "
                                                          "(fedmla evaluate phase; 0 = none)")
    node_cpus: float = Field(1.0, gt=0, description="Ray CPUs per ClientApp (simulation client_resources)")
    torch_threads: int = Field(1, ge=1, description="torch threads per ClientApp")
    seed: int = 0

    # ---- derived -------------------------------------------------------------------------------
    def model_cfg(self) -> MLAConfig:
        return MLAConfig.preset(self.preset, **self.model_overrides)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "FlowerConfig":
        return cls.model_validate_json(text)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "FlowerConfig":
        """Flat Flower run config (``[tool.flwr.app.config]``) -> FlowerConfig.

        Keys: ``strategy``, ``num-server-rounds``, ``clients-per-round`` (0 = all),
        ``num-nodes``, ``preset``, ``model-overrides`` (JSON object), ``local-steps``,
        ``batch-size``, ``seq-len``, ``lr``, ``codec`` (JSON object of CodecConfig fields),
        ``data-dir`` ("" = stdlib corpus), ``partition`` ("" = natural clients),
        ``max-bytes-per-client``, ``node-cpus``, ``seed``; ``config-json`` (a whole
        FlowerConfig as JSON) is the base the other keys override.
        """
        rc = dict(run_config)
        base = cls.from_json(rc.pop("config-json")) if rc.get("config-json") else cls()
        rc.pop("results-path", None)
        upd: dict[str, Any] = {}
        simple = {"strategy": "strategy", "num-server-rounds": "rounds", "num-nodes": "num_nodes",
                  "preset": "preset", "max-bytes-per-client": "max_bytes_per_client", "node-cpus": "node_cpus",
                  "seed": "seed", "alpha": "alpha", "client-eval-windows": "client_eval_windows"}
        for key, field in simple.items():
            if key in rc:
                upd[field] = rc.pop(key)
        if "clients-per-round" in rc:
            upd["clients_per_round"] = int(rc.pop("clients-per-round")) or None
        if "data-dir" in rc:
            upd["data_dir"] = str(rc.pop("data-dir")) or None
        if "partition" in rc:
            upd["partition"] = str(rc.pop("partition")) or None
        if "model-overrides" in rc:
            upd["model_overrides"] = json.loads(rc.pop("model-overrides") or "{}")
        if "codec" in rc:
            upd["codec"] = base.codec.model_copy(update=json.loads(rc.pop("codec") or "{}"))
        tr = {}
        for key, field in {"local-steps": "local_steps", "batch-size": "batch_size", "seq-len": "seq_len",
                           "lr": "lr"}.items():
            if key in rc:
                tr[field] = rc.pop(key)
        if rc:
            raise ValueError(f"unknown run config keys: {sorted(rc)}")
        cfg = base.model_copy(update=upd)
        # Re-validate (model_copy does not) and keep the cosine schedule spanning the run.
        data = cfg.model_dump()
        data["trainer"] = {**data["trainer"], **tr}
        if tr or "rounds" in upd:
            steps = data["trainer"]["local_steps"]
            data["trainer"]["total_steps"] = max(data["rounds"] * steps, 1)
            data["trainer"]["warmup_steps"] = min(data["trainer"]["warmup_steps"], steps)
        return cls.model_validate(data)

    @classmethod
    def from_bench(cls, bench, strategy: str = "fedavg", data_dir: str | None = None,
                   rounds: int | None = None) -> "FlowerConfig":
        """The same model, trainer, codec, clients and data as a communication-benchmark
        ``BenchConfig`` (read by attribute; this module does not import the benchmark)."""
        return cls(strategy=strategy, rounds=rounds or bench.rounds, num_nodes=bench.num_clients,
                   preset=bench.preset, model_overrides=dict(bench.model_overrides), trainer=bench.trainer,
                   codec=bench.codec, data_dir=data_dir, partition=bench.partition, alpha=bench.alpha,
                   max_bytes_per_client=bench.max_bytes_per_client,
                   eval_windows_per_client=bench.eval_windows_per_client, seed=bench.seed)

    def with_rounds(self, rounds: int) -> "FlowerConfig":
        """Same config with ``rounds`` and the trainer's schedule spanning them."""
        tr = self.trainer.model_copy(update={"total_steps": rounds * self.trainer.local_steps})
        return self.model_copy(update={"rounds": rounds, "trainer": tr})


def load_federated_data(cfg: FlowerConfig, num_nodes: int) -> FederatedData:
    """The data of a run with ``num_nodes`` nodes: node i trains on ``clients[i]``.

    Built-in corpus: the ``num_nodes`` largest stdlib packages (as in the communication
    benchmark). A folder: its clients, repartitioned (iid) when there are fewer than
    nodes. ``partition`` forces an iid/Dirichlet repartition over ``num_nodes`` clients.
    The validation set is the same whatever the partition.
    """
    seq = cfg.trainer.seq_len
    if cfg.data_dir:
        data = load_folder(cfg.data_dir, seq_len=seq, max_bytes_per_client=cfg.max_bytes_per_client,
                           eval_windows_per_client=cfg.eval_windows_per_client)
    else:
        data = load_stdlib_corpus(num_nodes, seq_len=seq, max_bytes_per_client=cfg.max_bytes_per_client,
                                  eval_windows_per_client=cfg.eval_windows_per_client)
    if cfg.partition is not None:
        return repartition(data, num_nodes, cfg.partition, cfg.alpha, cfg.seed)
    if len(data.clients) < num_nodes:
        return repartition(data, num_nodes, "iid", cfg.alpha, cfg.seed)
    if len(data.clients) > num_nodes:
        return FederatedData(data.clients[:num_nodes], data.validation, data.seq_len, data.source)
    return data
