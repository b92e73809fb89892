"""`fedmla bench comm`: fedmla's codec against two uncompressed baselines, FedAvg and
DiLoCo in fp32, side by side: same clients, client sampling, seeds, model, local
trainer and local steps. All three are configurations of the one codec pipeline
(:meth:`CodecConfig.fedavg`, :meth:`CodecConfig.diloco`, the codec under test) run by
the same loop, :func:`run_method`.

Every byte is counted from the serialized protobuf messages. Per round, each sampled
client first catches up from what it holds (nothing, or the version it last trained
from) to the current global with the cheapest exact payload
(:func:`fedmla.protos.codec.catchup.plan_catchup`: the stored downlinks replayed from
its version, or from the seeded initial model when it holds nothing, or the full
state), receives the round's active-head lists, trains and sends its update. Every
catch-up is applied by that client's own replica and hash-checked against the
coordinator's global. The same rules hold for every method, so the baselines get the
cheapest exact catch-up too (for them a full fp32 state is never larger than a chain).

The baselines run R rounds; the codec runs until its validation loss is within
``tolerance`` (2%) of each baseline's final loss (capped at 2R rounds) and, for the
tight figures, within ``tight_tolerance`` (0.5%, capped at 3R rounds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedmla.mla_model import MLAConfig, init_global_state
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.seeds import derive_seed

from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec
from fedmla.protos.codec.catchup import apply_catchup, catchup_payload, plan_catchup
from fedmla.protos.codec.transfer import dense_message, encode_full_state
from fedmla.protos.codec.wire import TensorCodec

from fedmla.worker.data import (FederatedData, check_tokenizer_fits, load_folder, load_stdlib_corpus, model_tokenizer,
                                repartition)
from fedmla.worker.trainer import LocalTrainer, TrainerConfig

BASELINES = ("fedavg", "diloco")


class BenchError(ValueError):
    """A bad option or an inconsistent request (printed by the CLI, exit code 2)."""


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "tiny"
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    model_dir: str | None = Field(None, description=(
        "start from this Hugging Face DeepSeek-V2/V3 checkpoint folder instead of the preset (its tokenizer.json, "
        "if any, tokenizes the data)"))
    num_clients: int = Field(4, ge=1)
    clients_per_round: int | None = Field(None, ge=1, description=(
        "M: clients sampled per round (seeded, the same for every method of a run); None = all"))
    rounds: int = Field(16, ge=1, description="R: baseline rounds; the codec is capped at max_round_factor * R")
    max_round_factor: float = 2.0
    tight_round_factor: float = Field(3.0, description="round cap of the codec for the tight targets")
    tolerance: float = Field(0.02, ge=0, description="target = (1 + tolerance) * baseline final val loss")
    tight_tolerance: float = Field(0.005, ge=0, description="the tight targets (ratio_vs_tight)")
    trainer: TrainerConfig = TrainerConfig()
    codec: CodecConfig = CodecConfig()
    partition: str | None = Field(None, description="None: natural clients; 'iid' or 'dirichlet'")
    alpha: float = 0.5
    max_bytes_per_client: int = 120_000
    eval_windows_per_client: int = 16
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "BenchConfig":
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) exceeds the number of clients "
                             f"({self.num_clients})")
        if self.tight_round_factor < self.max_round_factor:
            raise ValueError("tight_round_factor must be >= max_round_factor")
        return self

    def baseline_codec(self, name: str) -> CodecConfig:
        """The uncompressed baselines (the codec's presets) with this run's seed and, for
        DiLoCo, the outer step of the codec under test."""
        if name == "fedavg":
            return CodecConfig.fedavg(seed=self.codec.seed)
        if name == "diloco":
            c = self.codec
            return CodecConfig.diloco(seed=c.seed, outer_lr=c.outer_lr, outer_momentum=c.outer_momentum)
        raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")


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


def sample_clients(names: list[str], per_round: int | None, seed: int, round_idx: int) -> list[str]:
    """The clients of round ``round_idx``: all of them, or ``per_round`` drawn without
    replacement by a generator seeded with (seed, round): a function of the round only,
    so every method of a run trains the same clients in the same round."""
    if per_round is None or per_round >= len(names):
        return list(names)
    g = torch.Generator().manual_seed(derive_seed(seed, "sample-clients", round_idx))
    pick = torch.randperm(len(names), generator=g)[:per_round].tolist()
    return [names[i] for i in sorted(pick)]


class _Run:
    def __init__(self, cfg: BenchConfig, data: FederatedData):
        self.cfg = cfg
        self.data = data
        if cfg.model_dir is not None:
            from fedmla.mla_model.hf_checkpoint import read_hf_checkpoint
            if cfg.model_overrides:
                raise BenchError("model_overrides apply to a preset, not to a model_dir checkpoint")
            ckpt = read_hf_checkpoint(cfg.model_dir)
            self.model_cfg, self.init_state = ckpt.cfg, ckpt.state
        else:
            self.model_cfg = MLAConfig.preset(cfg.preset, **cfg.model_overrides)
            self.init_state = init_global_state(self.model_cfg, cfg.seed)
        check_tokenizer_fits(model_tokenizer(cfg.model_dir), self.model_cfg.vocab_size)
        self.trainer = LocalTrainer(self.model_cfg, cfg.trainer)
        self.fp32_model_bytes = dense_message(self.init_state).ByteSize()

    def val_loss(self, state) -> float:
        return self.trainer.evaluate(state, self.data.validation)["loss"]


def _mask_bytes(plan) -> int:
    return sum(pb.HeadSelection(heads=row.nonzero().flatten().tolist()).ByteSize() for row in plan.mask)


def run_method(run: _Run, codec: CodecConfig, max_rounds: int, stop=None, log=print, label: str = "fedmla") -> dict:
    """One method (any codec configuration) for up to ``max_rounds`` rounds, or until
    ``stop(val_loss)`` is true. Per round and sampled client: the catch-up to the
    current global (planned, sent, applied by the client's replica and hash-checked),
    the active-head lists and the uplink. The round's downlink is stored in the chain
    that later catch-ups replay."""
    cfg = run.cfg
    shapes = {n: tuple(t.shape) for n, t in run.init_state.items()}
    server = ServerCodec(run.model_cfg, codec, run.init_state)
    names = run.data.names
    by_name = {c.name: c for c in run.data.clients}
    codecs = {n: ClientCodec(run.model_cfg, codec, shapes, n) for n in names}
    tensors = TensorCodec(run.model_cfg, codec, shapes)
    held: dict[str, tuple[dict, Any] | None] = {n: None for n in names}   # each client's replica
    chain: list[bytes] = []
    rounds, total = [], 0
    kinds = {"none": 0, "chain": 0, "full": 0}
    t0 = time.time()
    for r in range(max_rounds):
        plan = server.plan()
        version = server.shared.round
        expected = server.global_hash()
        full_cache: list[bytes] = []

        def full_state() -> bytes:
            if not full_cache:
                full_cache.append(encode_full_state(server.global_state, server.shared))
            return full_cache[0]

        full_bytes = len(full_state())
        mask_bytes = _mask_bytes(plan)
        agg = server.aggregator(plan)
        sampled = sample_clients(names, cfg.clients_per_round, cfg.seed, r)
        down, up, catch = [], [], []
        for name in sampled:
            h = held[name]
            cp = plan_catchup(None if h is None else h[1].round, version, [len(b) for b in chain], full_bytes)
            payload = catchup_payload(cp, chain, full_state)
            state, shared = apply_catchup(cp, payload, None if h is None else h[0], None if h is None else h[1],
                                          run.model_cfg, codec, cfg.seed, expected, tensors,
                                          initial_state=run.init_state)
            kinds[cp.kind] += 1
            catch.append({"client": name, "kind": cp.kind, "from": None if h is None else h[1].round,
                          "downlinks": cp.downlinks, "bytes": cp.bytes})
            down.append(cp.bytes + mask_bytes)
            res = run.trainer.train(state, by_name[name], round_idx=r)
            msg = codecs[name].encode(state, res.state, plan, res.importance, res.num_examples,
                                      {"train_loss": res.metrics["train_loss"]})
            wire = msg.SerializeToString()
            up.append(len(wire))
            agg.add(name, server.decode(pb.ModelUpdate.FromString(wire), plan))
            held[name] = (state, shared)
        down_msg = server.finish_round(plan, agg.finish(), agg.importance())
        chain.append(down_msg.SerializeToString())
        total += sum(up) + sum(down)
        loss = run.val_loss(server.global_state)
        rounds.append({"round": r, "val_loss": loss, "clients": sampled, "up_bytes": up, "down_bytes": down,
                       "catchup": catch, "head_list_bytes": mask_bytes, "downlink_message_bytes": len(chain[-1]),
                       "full_state_bytes": full_bytes, "bytes_cum": total, "active_heads": int(plan.mask.sum()),
                       "hash_ok": True})
        log(f"  {label} round {r:3d}  val {loss:.4f}  up {sum(up) // len(up):,} B/client  "
            f"down {sum(down) // len(down):,} B/client  cum {total:,}")
        if stop is not None and stop(loss):
            break
    return {"bytes_total": total, "rounds": len(rounds), "final_val_loss": rounds[-1]["val_loss"],
            "per_round": rounds, "catchup_kinds": kinds, "wall_seconds": time.time() - t0,
            "global_hash": server.global_hash(), "codec": codec.model_dump()}


def first_reaching(res: dict, target: float, cap: int) -> dict:
    """Bytes and rounds of ``res`` (a :func:`run_method` result) until its validation loss
    is <= ``target`` within ``cap`` rounds; otherwise the bytes of the rounds it ran
    (at most ``cap``) and ``reached: False``."""
    rows = res["per_round"][:cap]
    for row in rows:
        if row["val_loss"] <= target:
            return {"target": target, "reached": True, "rounds": row["round"] + 1, "bytes": row["bytes_cum"],
                    "val_loss": row["val_loss"]}
    return {"target": target, "reached": False, "rounds": len(rows), "bytes": rows[-1]["bytes_cum"],
            "val_loss": rows[-1]["val_loss"]}


def ablation_variants(base: CodecConfig) -> list[tuple[str, CodecConfig]]:
    """Named variants for the README table: the headline built up step by step, then one
    change of the headline per row."""
    u = base.model_copy
    plain = {"factor_bits": 0, "dense_bits": 0, "downlink_bits": 0, "embed_downlink_bits": None, "entropy_coding": False,
             "half_scales": False}
    return [
        ("low-rank only (fp32 factors, all heads)", u(update={**plain, "head_selection": False})),
        ("+ quantisation (3-bit up, 3-bit down with a 4-bit embedding, all heads)",
         u(update={"head_selection": False, "entropy_coding": False, "half_scales": False})),
        ("+ entropy coding, fp16 scales (all heads)", u(update={"head_selection": False})),
        ("+ head selection = headline", base),
        ("4-bit uplink instead of 3-bit", u(update={"factor_bits": 4})),
        ("4-bit downlink instead of 3-bit (every factor)", u(update={"downlink_bits": 4})),
        ("embedding's downlink at 3 bits too (not 4)", u(update={"embed_downlink_bits": None})),
        ("int8 factors", u(update={"factor_bits": 8, "downlink_bits": 8, "embed_downlink_bits": None})),
        ("momentum not replicated (the whole step is sent down)", u(update={"replicate_momentum": False})),
        ("full residuals (decay 1.0 on both sides)", u(update={"residual_decay": 1.0, "server_residual_decay": 1.0})),
        ("no error feedback", u(update={"error_feedback": False})),
        ("factors not rotated before quantisation", u(update={"rotate_factors": False})),
        ("server residual decay 0.7 (the previous default)", u(update={"server_residual_decay": 0.7})),
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


def _comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("codec", "max_round_factor", "tight_round_factor",
                                                       "tolerance", "tight_tolerance")}


def _with_defaults(saved: dict, cfg: BenchConfig) -> dict:
    """A saved run's config with the defaults of fields added since it was written (so an
    older JSON of the same settings stays reusable); ``{}`` when it no longer validates.
    Its codec is replaced by ``cfg``'s: the codec is not part of the comparison."""
    try:
        return json.loads(BenchConfig.model_validate({**saved, "codec": cfg.codec.model_dump()}).model_dump_json())
    except (ValidationError, TypeError):
        return {}


def run_bench(cfg: BenchConfig, data_dir: str | None = None, ablation: bool = False, log=print,
              reuse_baselines: dict | None = None, compare: list[CodecConfig] | None = None) -> dict:
    """Both baselines, then the codec to every target; ``reuse_baselines`` (a previous
    output of this function for the same config, data and seed) skips the baselines.
    ``compare``: further codec configurations run against the same baselines and targets
    (``out["compare"]``: one row each, with its ratios against both baselines)."""
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    data = load_data(cfg, data_dir)
    run = _Run(cfg, data)
    log(f"data: {data.source}; clients {data.names}; model {cfg.model_dir or cfg.preset} "
        f"({sum(t.numel() for t in run.init_state.values()):,} params, fp32 message {run.fp32_model_bytes:,} B); "
        f"clients per round {cfg.clients_per_round or 'all'}")
    if reuse_baselines is not None:
        saved = _comparable(_with_defaults(reuse_baselines["config"], cfg))
        if (saved != _comparable(json.loads(cfg.model_dump_json()))
                or reuse_baselines["data"]["fingerprint"] != data.fingerprint()):
            raise BenchError("the baselines to reuse come from another configuration or data set")
        bases = reuse_baselines["baselines"]
    else:
        bases = {}
        for name in BASELINES:
            bases[name] = run_method(run, cfg.baseline_codec(name), cfg.rounds, log=log, label=name)
    targets = {name: bases[name]["final_val_loss"] * (1 + cfg.tolerance) for name in BASELINES}
    tight = {name: bases[name]["final_val_loss"] * (1 + cfg.tight_tolerance) for name in BASELINES}
    cap = int(round(cfg.max_round_factor * cfg.rounds))
    tight_cap = int(round(cfg.tight_round_factor * cfg.rounds))
    log("targets: " + ", ".join(f"{n} {targets[n]:.4f} (tight {tight[n]:.4f})" for n in BASELINES))
    # One codec run serves every target: it stops once all are reached or at the tight cap.
    lowest = min(list(targets.values()) + list(tight.values()))
    fed = run_method(run, cfg.codec, tight_cap, stop=lambda loss: loss <= lowest, log=log)
    reach = {n: first_reaching(fed, targets[n], cap) for n in BASELINES}
    reach_tight = {n: first_reaching(fed, tight[n], tight_cap) for n in BASELINES}
    fa = reach["fedavg"]
    fed.update({"bytes_to_target": fa["bytes"], "rounds_to_target": fa["rounds"], "reached_target": fa["reached"],
                "val_loss_at_target": fa["val_loss"], "targets": reach, "tight_targets": reach_tight})
    ratio_vs = {n: bases[n]["bytes_total"] / reach[n]["bytes"] for n in BASELINES}
    out = {
        "config": cfg.model_dump(), "data": {"source": data.source, "clients": data.names,
                                             "fingerprint": data.fingerprint()},
        "model_parameters": sum(t.numel() for t in run.init_state.values()),
        "fp32_model_message_bytes": run.fp32_model_bytes,
        "baselines": bases, "fedmla": fed,
        "target_val_loss": targets["fedavg"], "target_val_loss_vs": targets, "tight_target_val_loss_vs": tight,
        "ratio_vs": ratio_vs, "reached_target_vs": {n: reach[n]["reached"] for n in BASELINES},
        "ratio_vs_tight": {n: bases[n]["bytes_total"] / reach_tight[n]["bytes"] for n in BASELINES},
        "reached_target_vs_tight": {n: reach_tight[n]["reached"] for n in BASELINES},
        "ratio": ratio_vs["fedavg"], "reached_target": reach["fedavg"]["reached"],
    }
    if compare:
        out["compare"] = []
        for i, codec in enumerate(compare):
            log(f"compare {i}: {codec.model_dump_json(exclude_defaults=True)}")
            res = run_method(run, codec, cap, stop=lambda loss: loss <= min(targets.values()), log=log,
                             label=f"compare{i}")
            hits = {n: first_reaching(res, targets[n], cap) for n in BASELINES}
            out["compare"].append({
                "codec": codec.model_dump(), "changes": json.loads(codec.model_dump_json(exclude_defaults=True)),
                "ratio_vs": {n: bases[n]["bytes_total"] / hits[n]["bytes"] for n in BASELINES},
                "reached_target_vs": {n: hits[n]["reached"] for n in BASELINES}, "targets": hits,
                "rounds": res["rounds"], "final_val_loss": res["final_val_loss"], "bytes_total": res["bytes_total"],
                "per_round": res["per_round"]})
    if ablation:
        rows = []
        target = targets["fedavg"]
        for name, codec in ablation_variants(cfg.codec):
            log(f"ablation: {name}")
            res = fed if codec == cfg.codec else run_method(run, codec, cap, stop=lambda loss: loss <= target,
                                                             log=log)
            hit = first_reaching(res, target, cap)
            rows.append({"variant": name, "bytes_to_target": hit["bytes"], "rounds_to_target": hit["rounds"],
                         "final_val_loss": hit["val_loss"], "reached_target": hit["reached"],
                         "ratio": bases["fedavg"]["bytes_total"] / hit["bytes"], "codec": codec.model_dump()})
        out["ablation"] = rows
    out["wall_seconds"] = time.time() - t0
    return out


def summary(out: dict) -> dict:
    """The figures the CLI prints."""
    fed = out["fedmla"]
    return {
        "ratio_vs": out["ratio_vs"], "reached_target_vs": out["reached_target_vs"],
        "ratio_vs_tight": out["ratio_vs_tight"], "reached_target_vs_tight": out["reached_target_vs_tight"],
        "baselines": {n: {"bytes_total": b["bytes_total"], "final_val_loss": b["final_val_loss"]}
                      for n, b in out["baselines"].items()},
        "fedmla": {n: {"rounds": t["rounds"], "bytes": t["bytes"], "val_loss": t["val_loss"]}
                   for n, t in fed["targets"].items()},
        "fedmla_tight": {n: {"rounds": t["rounds"], "bytes": t["bytes"], "val_loss": t["val_loss"]}
                         for n, t in fed["tight_targets"].items()},
        "wall_seconds": round(out["wall_seconds"], 1),
        **({"compare": [{"changes": c["changes"], "ratio_vs": c["ratio_vs"], "reached_target_vs": c["reached_target_vs"],
                         "rounds_vs": {n: t["rounds"] for n, t in c["targets"].items()},
                         "final_val_loss": c["final_val_loss"]} for c in out["compare"]]} if "compare" in out else {}),
    }


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
        clients: int | None = typer.Option(None, "--clients", help="override the number of clients (N)"),
        clients_per_round: int | None = typer.Option(
            None, "--clients-per-round", help="clients sampled per round (M <= N; default: all)"),
        seed: int | None = typer.Option(None, help="override the seed"),
        config: Path | None = typer.Option(None, "--config", help="JSON BenchConfig to start from"),
        model: Path | None = typer.Option(None, "--model", help="start from this Hugging Face DeepSeek-V2/V3 "
                                          "checkpoint folder (and tokenize with its tokenizer.json, if any)"),
        codec_json: str | None = typer.Option(None, "--codec", help="JSON of CodecConfig fields to override"),
        reuse: Path | None = typer.Option(None, "--reuse-baselines",
                                          help="take the baselines from an earlier --json of the same settings"),
        compare_json: list[str] = typer.Option([], "--compare", help=(
            "JSON of CodecConfig fields to override for a further codec run against the same baselines "
            "(repeatable; each is applied to the run's codec)")),
    ) -> None:
        """fedmla's codec vs FedAvg and DiLoCo in fp32: total bytes to each baseline's loss (+2%, +0.5%)."""
        from fedmla.mla_model.hf import HFCheckpointError
        from fedmla.worker.data import DataError
        try:
            cfg = BenchConfig.model_validate_json(config.read_text()) if config else (
                quick_config() if quick else full_config())
            upd: dict[str, Any] = {}
            if rounds is not None:
                upd["rounds"] = rounds
                upd["trainer"] = cfg.trainer.model_copy(update={"total_steps": rounds * cfg.trainer.local_steps})
            if clients is not None:
                upd["num_clients"] = clients
            if clients_per_round is not None:
                upd["clients_per_round"] = clients_per_round
            if seed is not None:
                upd["seed"] = seed
            if model is not None:
                upd["model_dir"] = str(model)
                upd["model_overrides"] = {}
            if codec_json:
                upd["codec"] = CodecConfig.model_validate({**cfg.codec.model_dump(), **json.loads(codec_json)})
            cfg = BenchConfig.model_validate({**cfg.model_dump(), **{k: (v.model_dump() if hasattr(v, "model_dump")
                                                                        else v) for k, v in upd.items()}})
            compare = [CodecConfig.model_validate({**cfg.codec.model_dump(), **json.loads(c)}) for c in compare_json]
        except (ValidationError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        try:
            out = run_bench(cfg, str(data) if data else None, ablation=(not quick) if ablation is None else ablation,
                            log=lambda s: typer.echo(s, err=True),
                            reuse_baselines=json.loads(reuse.read_text()) if reuse else None, compare=compare)
        except (DataError, BenchError, HFCheckpointError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        json_path.write_text(json.dumps(out, indent=2))
        typer.echo(json.dumps(summary(out), indent=2))
