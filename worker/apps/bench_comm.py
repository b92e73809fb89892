"""`fedmla bench comm`: FedAvg in fp32 against fedmla's codec, side by side, same data,
seeds, model and local steps; bytes counted from the serialized protobuf messages.

The baseline runs R rounds and sends the full fp32 model up and down per client per
round. fedmla (and each ablation variant) runs until its validation loss is within
``tolerance`` (2%) of the baseline's final validation loss, capped at 2R rounds.
Every round the coordinator's global weights are hashed and compared with a separate
worker replica that only ever saw the downlink messages.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedmla.protos.weights import model_hash
from fedmla.mla_model import MLAConfig
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import encode_tensor

from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec, apply_downlink
from fedmla.protos.codec.wire import TensorCodec

from fedmla.worker.data import (FederatedData, check_tokenizer_fits, load_folder, load_stdlib_corpus, model_tokenizer,
                                repartition)
from fedmla.worker.trainer import LocalTrainer, TrainerConfig, init_global_state


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "tiny"
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    model_dir: str | None = Field(None, description=(
        "start from this Hugging Face DeepSeek-V2/V3 checkpoint folder instead of the preset (its tokenizer.json, "
        "if any, tokenizes the data)"))
    num_clients: int = Field(4, ge=1)
    rounds: int = Field(16, ge=1, description="R: baseline rounds; fedmla is capped at max_round_factor * R")
    max_round_factor: float = 2.0
    tolerance: float = Field(0.02, ge=0, description="target = (1 + tolerance) * baseline final val loss")
    trainer: TrainerConfig = TrainerConfig()
    codec: CodecConfig = CodecConfig()
    partition: str | None = Field(None, description="None: natural clients; 'iid' or 'dirichlet'")
    alpha: float = 0.5
    max_bytes_per_client: int = 120_000
    eval_windows_per_client: int = 16
    seed: int = 0


def _fedavg_message(state: dict[str, torch.Tensor], num_examples: int = 0) -> pb.ModelUpdate:
    return pb.ModelUpdate(dense=[pb.DenseUpdate(name=n, value=encode_tensor(state[n].float())) for n in sorted(state)],
                          num_examples=num_examples)


def load_data(cfg: BenchConfig, data_dir: str | None) -> FederatedData:
    seq = cfg.trainer.seq_len
    tok = model_tokenizer(cfg.model_dir)
    if data_dir:
        data = load_folder(data_dir, seq_len=seq, max_bytes_per_client=cfg.max_bytes_per_client,
                           eval_windows_per_client=cfg.eval_windows_per_client, tokenizer=tok)
        if cfg.partition is None and len(data.clients) > cfg.num_clients:
            data = FederatedData(data.clients[: cfg.num_clients], data.validation, data.seq_len, data.source)
    else:
        data = load_stdlib_corpus(cfg.num_clients, seq_len=seq, max_bytes_per_client=cfg.max_bytes_per_client,
                                  eval_windows_per_client=cfg.eval_windows_per_client, tokenizer=tok)
    if cfg.partition is not None:
        data = repartition(data, cfg.num_clients, cfg.partition, cfg.alpha, cfg.seed)
    return data


class _Run:
    def __init__(self, cfg: BenchConfig, data: FederatedData):
        self.cfg = cfg
        self.data = data
        if cfg.model_dir is not None:
            from fedmla.mla_model.hf_checkpoint import read_hf_checkpoint
            if cfg.model_overrides:
                raise ValueError("model_overrides apply to a preset, not to a model_dir checkpoint")
            ckpt = read_hf_checkpoint(cfg.model_dir)
            self.model_cfg, self.init_state = ckpt.cfg, ckpt.state
        else:
            self.model_cfg = MLAConfig.preset(cfg.preset, **cfg.model_overrides)
            self.init_state = init_global_state(self.model_cfg, cfg.seed)
        check_tokenizer_fits(model_tokenizer(cfg.model_dir), self.model_cfg.vocab_size)
        self.trainer = LocalTrainer(self.model_cfg, cfg.trainer)
        self.fp32_model_bytes = _fedavg_message(self.init_state).ByteSize()

    def val_loss(self, state) -> float:
        return self.trainer.evaluate(state, self.data.validation)["loss"]


def run_baseline(run: _Run, log=print) -> dict:
    """FedAvg, full fp32 models up and down, example-weighted mean (float64, sorted order)."""
    cfg = run.cfg
    glob = {n: t.clone() for n, t in run.init_state.items()}
    rounds, total = [], 0
    t0 = time.time()
    for r in range(cfg.rounds):
        acc = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in glob.items()}
        n_total, up, down = 0, [], []
        for c in run.data.clients:
            res = run.trainer.train(glob, c, round_idx=r)
            up.append(_fedavg_message(res.state, res.num_examples).ByteSize())
            for n in acc:
                acc[n] += res.state[n].double() * res.num_examples
            n_total += res.num_examples
        glob = {n: (a / n_total).float() for n, a in acc.items()}
        down = [_fedavg_message(glob).ByteSize() for _ in run.data.clients]
        total += sum(up) + sum(down)
        loss = run.val_loss(glob)
        rounds.append({"round": r, "val_loss": loss, "up_bytes": up, "down_bytes": down, "bytes_cum": total})
        log(f"  baseline round {r:3d}  val {loss:.4f}  bytes {total:,}")
    return {"bytes_total": total, "final_val_loss": rounds[-1]["val_loss"], "rounds": len(rounds),
            "per_round": rounds, "wall_seconds": time.time() - t0, "global_hash": model_hash(glob)}


def run_fedmla(run: _Run, codec: CodecConfig, target: float | None, max_rounds: int, log=print) -> dict:
    """fedmla's codec until val loss <= target (or max_rounds). Checks worker/coordinator hashes."""
    shapes = {n: tuple(t.shape) for n, t in run.init_state.items()}
    server = ServerCodec(run.model_cfg, codec, run.init_state)
    clients = {c.name: ClientCodec(run.model_cfg, codec, shapes, c.name) for c in run.data.clients}
    # The worker replica: its own global copy and shared state, fed only with downlink bytes.
    w_tensors = TensorCodec(run.model_cfg, codec, shapes)
    w_global = {n: t.clone() for n, t in server.global_state.items()}
    w_shared = server.shared
    rounds, total, fedavg_equiv = [], 0, 0
    reached_at = None
    t0 = time.time()
    for r in range(max_rounds):
        plan = server.plan()
        mask_bytes = sum(pb.HeadSelection(heads=row.nonzero().flatten().tolist()).ByteSize() for row in plan.mask)
        agg = server.aggregator(plan)
        up = []
        for c in run.data.clients:
            res = run.trainer.train(w_global, c, round_idx=r)
            msg = clients[c.name].encode(w_global, res.state, plan, res.importance, res.num_examples,
                                         {"train_loss": res.metrics["train_loss"]})
            wire = msg.SerializeToString()
            up.append(len(wire))
            agg.add(c.name, server.decode(pb.ModelUpdate.FromString(wire), plan))
        down_msg = server.finish_round(plan, agg.finish(), agg.importance())
        wire = down_msg.SerializeToString()
        w_global, w_shared = apply_downlink(w_global, w_shared, pb.ModelUpdate.FromString(wire), w_tensors)
        hash_ok = model_hash(w_global) == server.global_hash() and w_shared.digest() == server.shared.digest()
        if not hash_ok:
            raise RuntimeError(f"round {r}: worker and coordinator global weights differ")
        down = [len(wire) + mask_bytes for _ in run.data.clients]
        total += sum(up) + sum(down)
        fedavg_equiv += 2 * run.fp32_model_bytes * len(run.data.clients)
        loss = run.val_loss(server.global_state)
        rounds.append({"round": r, "val_loss": loss, "up_bytes": up, "down_bytes": down, "bytes_cum": total,
                       "fedavg_fp32_bytes_cum": fedavg_equiv, "active_heads": int(plan.mask.sum()),
                       "hash_ok": hash_ok})
        log(f"  fedmla round {r:3d}  val {loss:.4f}  up {sum(up) // len(up):,} B/client  "
            f"down {down[0]:,} B/client  cum {total:,}")
        if target is not None and loss <= target:
            reached_at = r
            break
    return {"bytes_to_target": total, "rounds_to_target": len(rounds), "final_val_loss": rounds[-1]["val_loss"],
            "reached_target": reached_at is not None, "per_round": rounds, "wall_seconds": time.time() - t0,
            "global_hash": server.global_hash(), "codec": codec.model_dump()}


def ablation_variants(base: CodecConfig) -> list[tuple[str, CodecConfig]]:
    """Named variants for the README table: the headline built up step by step, then one
    change of the headline per row."""
    u = base.model_copy
    plain = {"factor_bits": 0, "dense_bits": 0, "downlink_bits": 0, "entropy_coding": False, "half_scales": False}
    return [
        ("low-rank only (fp32 factors, all heads)", u(update={**plain, "head_selection": False})),
        ("+ quantisation (3-bit up, 4-bit down, all heads)",
         u(update={"head_selection": False, "entropy_coding": False, "half_scales": False})),
        ("+ entropy coding, fp16 scales (all heads)", u(update={"head_selection": False})),
        ("+ head selection = headline", base),
        ("4-bit uplink instead of 3-bit", u(update={"factor_bits": 4})),
        ("3-bit downlink too", u(update={"downlink_bits": 3})),
        ("int8 factors", u(update={"factor_bits": 8, "downlink_bits": 8})),
        ("momentum not replicated (the whole step is sent down)", u(update={"replicate_momentum": False})),
        ("full residuals (decay 1.0 on both sides)", u(update={"residual_decay": 1.0, "server_residual_decay": 1.0})),
        ("no error feedback", u(update={"error_feedback": False})),
        ("powersgd shared basis (one factor each way)", u(update={"method": "powersgd"})),
        ("rank 8", u(update={"rank": 8})),
        ("rank 16", u(update={"rank": 16})),
        ("keep ratio 0.25", u(update={"keep_ratio": 0.25})),
        ("keep ratio 0.75", u(update={"keep_ratio": 0.75})),
        ("outer FedAvg (lr 1) instead of Nesterov", u(update={"outer": "fedavg"})),
    ]


def quick_config() -> BenchConfig:
    """Settings of `--quick`: the tiny MLA preset widened to d=256, SwiGLU 1024 (1.7M
    parameters, a 6.9 MB fp32 message), 4 stdlib clients, seq 64, 20 local steps, R=10.
    A few minutes on 2 cores. (Width matters for the ratio: FedAvg's bytes grow with
    d^2, rank-r factors with d * r; README reports the d=128 figures too.)"""
    rounds, steps = 10, 20
    return BenchConfig(
        preset="tiny", model_overrides={"dim": 256, "inter_dim": 1024}, num_clients=4, rounds=rounds,
        trainer=TrainerConfig(local_steps=steps, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=steps,
                              total_steps=rounds * steps),
        codec=CodecConfig(),
    )


def full_config() -> BenchConfig:
    """The README run: the quick settings with R=12 (and the ablation)."""
    q = quick_config()
    rounds = 12
    return q.model_copy(update={"rounds": rounds, "trainer": q.trainer.model_copy(
        update={"total_steps": rounds * q.trainer.local_steps})})


def run_bench(cfg: BenchConfig, data_dir: str | None = None, ablation: bool = False, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    data = load_data(cfg, data_dir)
    run = _Run(cfg, data)
    log(f"data: {data.source}; clients {data.names}; model {cfg.model_dir or cfg.preset} "
        f"({sum(t.numel() for t in run.init_state.values()):,} params, fp32 message {run.fp32_model_bytes:,} B)")
    base = run_baseline(run, log)
    target = base["final_val_loss"] * (1 + cfg.tolerance)
    max_rounds = int(round(cfg.max_round_factor * cfg.rounds))
    log(f"target val loss {target:.4f}")
    fed = run_fedmla(run, cfg.codec, target, max_rounds, log)
    out = {
        "config": cfg.model_dump(), "data": {"source": data.source, "clients": data.names,
                                             "fingerprint": data.fingerprint()},
        "model_parameters": sum(t.numel() for t in run.init_state.values()),
        "fp32_model_message_bytes": run.fp32_model_bytes,
        "baseline": base, "fedmla": fed, "target_val_loss": target,
        "ratio": base["bytes_total"] / fed["bytes_to_target"], "reached_target": fed["reached_target"],
    }
    if ablation:
        rows = []
        for name, codec in ablation_variants(cfg.codec):
            log(f"ablation: {name}")
            res = fed if codec == cfg.codec else run_fedmla(run, codec, target, max_rounds, log)
            rows.append({"variant": name, "bytes_to_target": res["bytes_to_target"],
                         "rounds_to_target": res["rounds_to_target"], "final_val_loss": res["final_val_loss"],
                         "reached_target": res["reached_target"],
                         "ratio": base["bytes_total"] / res["bytes_to_target"], "codec": codec.model_dump()})
        out["ablation"] = rows
    out["wall_seconds"] = time.time() - t0
    return out


def register(app, bench) -> None:
    import typer

    @bench.command("comm")
    def comm(
        quick: bool = typer.Option(False, "--quick", help="small settings that finish in minutes on 2 cores"),
        data: Path | None = typer.Option(None, "--data", help="folder with one subfolder of text files per client"),
        json_path: Path = typer.Option(..., "--json", help="where to write the results"),
        ablation: bool | None = typer.Option(None, "--ablation/--no-ablation",
                                      help="also run the ablation variants (default: on for full runs)"),
        rounds: int | None = typer.Option(None, help="override R (baseline rounds)"),
        clients: int | None = typer.Option(None, help="override the number of clients"),
        seed: int | None = typer.Option(None, help="override the seed"),
        config: Path | None = typer.Option(None, "--config", help="JSON BenchConfig to start from"),
        model: Path | None = typer.Option(None, "--model", help="start from this Hugging Face DeepSeek-V2/V3 "
                                          "checkpoint folder (and tokenize with its tokenizer.json, if any)"),
    ) -> None:
        """FedAvg (fp32) vs fedmla's codec: bytes to reach the baseline's loss (within 2%)."""
        from fedmla.worker.data import DataError
        cfg = BenchConfig.model_validate_json(config.read_text()) if config else (
            quick_config() if quick else full_config())
        upd: dict[str, Any] = {}
        if rounds is not None:
            upd["rounds"] = rounds
            upd["trainer"] = cfg.trainer.model_copy(update={"total_steps": rounds * cfg.trainer.local_steps})
        if clients is not None:
            upd["num_clients"] = clients
        if seed is not None:
            upd["seed"] = seed
        if model is not None:
            upd["model_dir"] = str(model)
            upd["model_overrides"] = {}
        cfg = cfg.model_copy(update=upd)
        from fedmla.mla_model.hf import HFCheckpointError
        try:
            out = run_bench(cfg, str(data) if data else None, ablation=(not quick) if ablation is None else ablation,
                            log=lambda s: typer.echo(s, err=True))
        except (DataError, HFCheckpointError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        json_path.write_text(json.dumps(out, indent=2))
        typer.echo(json.dumps({k: out[k] for k in ("ratio", "reached_target", "target_val_loss")}
                              | {"baseline_bytes": out["baseline"]["bytes_total"],
                                 "baseline_final_val_loss": out["baseline"]["final_val_loss"],
                                 "fedmla_bytes_to_target": out["fedmla"]["bytes_to_target"],
                                 "fedmla_rounds_to_target": out["fedmla"]["rounds_to_target"],
                                 "fedmla_final_val_loss": out["fedmla"]["final_val_loss"],
                                 "wall_seconds": round(out["wall_seconds"], 1)}, indent=2))
