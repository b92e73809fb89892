"""The Flower ServerApp (``strategy = fedmla | fedavg``) and :func:`run_flower_simulation`.

``flwr run .`` loads ``app`` below, which reads the run config (``[tool.flwr.app.config]``,
overridable with ``--run-config``). Python callers use :func:`run_flower_simulation`,
which builds a ServerApp bound to a :class:`FlowerConfig` and runs Flower's simulation
runtime (Ray) with ``num_nodes`` virtual SuperNodes, returning a result dict.

Both strategies start from the same seeded weights (``init_global_state``), train with
the same :class:`~worker.trainer.LocalTrainer` on the same node data, and are evaluated
centrally on the same held-out windows after every round.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedmla.protos.weights import model_hash

from ..trainer import LocalTrainer, init_global_state
from .client_app import RUN_KEY
from .config import FlowerConfig, load_federated_data
from .strategy import CountingFedAvg, FedMLAStrategy
from .wire import dense_message


def run_strategy(grid: Grid, cfg: FlowerConfig) -> dict:
    """Run ``cfg.rounds`` rounds of ``cfg.strategy`` on ``grid``; the result dict."""
    t0 = time.time()
    model_cfg = cfg.model_cfg()
    init = init_global_state(model_cfg, cfg.seed)
    data = load_federated_data(cfg, cfg.num_nodes)
    evaluator = LocalTrainer(model_cfg, cfg.trainer)
    val_losses: dict[int, float] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        loss = evaluator.evaluate(arrays.to_torch_state_dict(), data.validation)["loss"]
        val_losses[server_round] = loss
        return MetricRecord({"val_loss": loss})

    fp32_bytes = dense_message(init).ByteSize()
    run_json = cfg.to_json()
    k = cfg.clients_per_round or cfg.num_nodes
    if cfg.strategy == "fedmla":
        strategy = FedMLAStrategy(cfg, init, min_available_nodes=cfg.num_nodes)
    else:
        strategy = CountingFedAvg(fp32_bytes, fraction_train=min(k / cfg.num_nodes, 1.0), fraction_evaluate=0.0,
                                  min_train_nodes=k, min_evaluate_nodes=0, min_available_nodes=cfg.num_nodes)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_state_dict=init), num_rounds=cfg.rounds,
                            train_config=ConfigRecord({RUN_KEY: run_json}),
                            evaluate_config=ConfigRecord({RUN_KEY: run_json}), evaluate_fn=evaluate_fn)
    final = result.arrays.to_torch_state_dict() if len(result.arrays) else init
    per_round = []
    up_total = down_total = fedavg_total = 0
    for rec in strategy.rounds:
        r = rec["round"]
        up, down = sum(rec["up_bytes"].values()), sum(rec["down_bytes"].values())
        up_total, down_total, fedavg_total = up_total + up, down_total + down, fedavg_total + rec["fedavg_fp32_bytes"]
        row = {k2: v for k2, v in rec.items() if k2 not in ("nodes",)}
        row.update({"nodes": [str(n) for n in rec["nodes"]], "val_loss": val_losses.get(r),
                    "bytes_up": up, "bytes_down": down, "bytes_cum": up_total + down_total,
                    "fedavg_fp32_bytes_cum": fedavg_total})
        per_round.append(row)
    out = {
        "strategy": cfg.strategy, "rounds": len(per_round), "config": cfg.model_dump(),
        "model_parameters": sum(t.numel() for t in init.values()), "fp32_model_message_bytes": fp32_bytes,
        "data": {"source": data.source, "clients": data.names},
        "initial_val_loss": val_losses.get(0), "val_losses": [val_losses.get(r["round"]) for r in per_round],
        "final_val_loss": val_losses.get(per_round[-1]["round"]) if per_round else val_losses.get(0),
        "bytes_up": up_total, "bytes_down": down_total, "bytes_total": up_total + down_total,
        "fedavg_fp32_bytes_total": fedavg_total, "per_round": per_round,
        "global_hash": strategy.codec.global_hash() if cfg.strategy == "fedmla" else model_hash(final),
        "wall_seconds": time.time() - t0,
    }
    if cfg.strategy == "fedmla":
        out["hash_ok"] = [r.get("hash_ok") for r in per_round]
    return out


def make_server_app(cfg: FlowerConfig | None = None, sink: dict | None = None) -> ServerApp:
    """A ServerApp running ``cfg`` (or, if None, the run config of the Flower run). The
    result dict goes into ``sink['result']`` when given, and to the run config's
    ``results-path`` (JSON) when set."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config: dict[str, Any] = dict(context.run_config)
        results_path = str(run_config.get("results-path", "") or "")
        conf = cfg if cfg is not None else FlowerConfig.from_run_config(run_config)
        out = run_strategy(grid, conf)
        if sink is not None:
            sink["result"] = out
        if results_path:
            Path(results_path).write_text(json.dumps(out, indent=2))
        summary = {k: out[k] for k in ("strategy", "rounds", "initial_val_loss", "val_losses", "bytes_total",
                                       "fedavg_fp32_bytes_total")}
        print(json.dumps(summary | ({"hash_ok": out["hash_ok"]} if "hash_ok" in out else {})), flush=True)

    return server_app


app = make_server_app()


def run_flower_simulation(config: FlowerConfig | dict | None = None, verbose: bool = False) -> dict:
    """Run one Flower simulation (Ray backend, a private local Ray instance that Flower
    shuts down at the end) and return the result dict.

    ``config``: a :class:`FlowerConfig`, a dict of its fields, or None for the defaults.
    Result keys: ``strategy``, ``rounds``, ``initial_val_loss``, ``val_losses`` (after each
    round), ``final_val_loss``, ``bytes_up``/``bytes_down``/``bytes_total`` (all nodes, all
    rounds), ``fedavg_fp32_bytes_total`` (what FedAvg in fp32 would have sent over the same
    rounds and nodes), ``per_round`` (per-node ``up_bytes``/``down_bytes``, ``val_loss``,
    ``hash_ok`` for fedmla), ``global_hash``, ``fp32_model_message_bytes``, ``wall_seconds``.
    """
    from flwr.simulation import run_simulation

    from .client_app import app as client_app

    cfg = config if isinstance(config, FlowerConfig) else FlowerConfig.model_validate(config or {})
    sink: dict = {}
    # No more Ray CPUs than the nodes can use (each actor loads torch); at least one node's worth.
    num_cpus = max(cfg.node_cpus, min(float(os.cpu_count() or 1), cfg.num_nodes * cfg.node_cpus))
    backend = {
        # address "local": always a new Ray instance of our own, never someone else's cluster.
        "init_args": {"address": "local", "num_cpus": math.ceil(num_cpus), "include_dashboard": False,
                      "logging_level": "WARNING" if not verbose else "INFO", "log_to_driver": verbose},
        "client_resources": {"num_cpus": cfg.node_cpus, "num_gpus": 0.0},
    }
    # As in `fedmla simulate`: no Ray FutureWarning about accelerator variables (no GPUs are asked for).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(server_app=make_server_app(cfg, sink), client_app=client_app, num_supernodes=cfg.num_nodes,
                   backend_config=backend, verbose_logging=verbose)
    if "result" not in sink:
        raise RuntimeError("the Flower simulation ended without a result (see the log above)")
    return sink["result"]
