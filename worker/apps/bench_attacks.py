"""`fedmla bench attacks`: hostile clients against the codec coordinator, with and without a defence.

Every cell of the matrix is a federated run on the built-in corpus: ``honest`` clients
(10) train and send codec updates; ``f`` attackers (1, 2, 3) train too on their own
shard (a copy of honest clients' data), then send a poisoned update through the same
codec. The coordinator side is the product's: ``ServerCodec`` plan and downlink, and
either the exact mean (no defence) or :class:`~coordinator.defenses.RobustAggregator`.

Attacks (on the attacker's pseudo-gradient ``d``; ``mu``/``sigma`` are the coordinate-wise
mean and standard deviation of the honest clients' pseudo-gradients of the round, which
the colluding attackers are assumed to know):

- ``sign_flip``: ``-d``;  ``scaled``: ``boost * d``;  ``gaussian``: noise whose RMS is
  ``noise_scale`` x that of ``d``;
- ``alie`` (Baruch et al., "A Little Is Enough"): ``mu - z * sigma`` with z from the
  paper's formula for n clients of which f attack;
- ``inflated_importance``: an honest update, but head-importance scores of 1e6 on the
  heads the honest clients rate lowest: an attempt to take over the active-head mask.

Reported per cell: the final validation loss, its ratio to the clean run (no attackers,
no defence), ``within_5pct``, and for the importance attack how many of the final
mask's heads are the attackers' picks.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec
from fedmla.coordinator.defenses import DefenseConfig, RobustAggregator
from fedmla.mla_model import MLAConfig
from fedmla.protos.fedmla.v1 import types_pb2 as pb

from fedmla.worker.data import load_stdlib_corpus
from fedmla.worker.trainer import LocalTrainer, TrainerConfig, init_global_state

ATTACKS = ("sign_flip", "scaled", "gaussian", "alie", "inflated_importance")


class AttackBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "tiny"
    honest: int = Field(10, ge=3)
    attackers: list[int] = Field(default_factory=lambda: [1, 2, 3])
    attacks: list[Literal["sign_flip", "scaled", "gaussian", "alie", "inflated_importance"]] = \
        Field(default_factory=lambda: list(ATTACKS))
    rounds: int = Field(8, ge=1)
    trainer: TrainerConfig = TrainerConfig(local_steps=5, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5,
                                           total_steps=40)
    codec: CodecConfig = CodecConfig()
    defense: DefenseConfig = DefenseConfig(kind="trimmed_mean", trim=3)
    boost: float = Field(10.0, description="scaled attack: multiplier")
    noise_scale: float = Field(10.0, description="gaussian attack: noise RMS / honest update RMS")
    max_bytes_per_client: int = 30_000
    seed: int = 0


def quick_config() -> AttackBenchConfig:
    """`--quick`: every attack, f in {1, 2, 3}, 6 rounds of 4 local steps (minutes on 2 cores)."""
    return AttackBenchConfig(rounds=6, trainer=TrainerConfig(local_steps=4, batch_size=8, seq_len=64, lr=3e-3,
                                                             warmup_steps=4, total_steps=24))


def alie_z(n: int, f: int) -> float:
    """The paper's z_max: s = floor(n / 2 + 1) - f supporters needed; z = Phi^-1((n - s) / n)."""
    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
    return statistics.NormalDist().inv_cdf(p)


class _Bench:
    def __init__(self, cfg: AttackBenchConfig):
        self.cfg = cfg
        self.model_cfg = MLAConfig.preset(cfg.preset)
        self.data = load_stdlib_corpus(cfg.honest, seq_len=cfg.trainer.seq_len,
                                       max_bytes_per_client=cfg.max_bytes_per_client)
        self.trainer = LocalTrainer(self.model_cfg, cfg.trainer)
        self.init = init_global_state(self.model_cfg, cfg.seed)
        self.shapes = {n: tuple(t.shape) for n, t in self.init.items()}

    def val_loss(self, state) -> float:
        return self.trainer.evaluate(state, self.data.validation)["loss"]

    def run(self, f: int, attack: str | None, defended: bool) -> dict:
        cfg, mc = self.cfg, self.model_cfg
        server = ServerCodec(mc, cfg.codec, self.init)
        honest = self.data.clients
        names = [c.name for c in honest] + [f"attacker-{i}" for i in range(f)]
        codecs = {n: ClientCodec(mc, cfg.codec, self.shapes, n) for n in names}
        picks = None
        for r in range(cfg.rounds):
            plan = server.plan()
            glob = server.global_state
            deltas, results = {}, {}
            for c in honest:
                res = self.trainer.train(glob, c, round_idx=r)
                results[c.name] = res
                deltas[c.name] = {k: res.state[k] - glob[k] for k in glob}
            msgs = {n: codecs[n].encode(glob, results[n].state, plan, results[n].importance,
                                        results[n].num_examples) for n in results}
            if f and attack is not None:
                names_h = list(deltas)
                mean = {k: torch.stack([deltas[n][k] for n in names_h]).mean(0) for k in glob}
                std = {k: torch.stack([deltas[n][k] for n in names_h]).std(0) for k in glob}
                hi = torch.stack([results[n].importance for n in names_h]).mean(0)
                if picks is None:     # the heads the attackers push, fixed for the run: the honest clients' least wanted
                    picks = hi.argsort(dim=1)[:, : max(1, math.ceil(cfg.codec.keep_ratio * mc.n_heads))]
                for i in range(f):
                    src = honest[i % len(honest)]
                    d = deltas[src.name]
                    imp = results[src.name].importance
                    if attack == "sign_flip":
                        bad = {k: -v for k, v in d.items()}
                    elif attack == "scaled":
                        bad = {k: cfg.boost * v for k, v in d.items()}
                    elif attack == "gaussian":
                        g = torch.Generator().manual_seed(1000 * r + i)
                        bad = {k: torch.randn(v.shape, generator=g) * cfg.noise_scale * v.pow(2).mean().sqrt()
                               for k, v in d.items()}
                    elif attack == "alie":
                        z = alie_z(len(names), f)
                        bad = {k: mean[k] - z * std[k] for k in glob}
                    else:   # inflated importance: honest weights, lying scores
                        bad = d
                        imp = torch.zeros_like(imp)
                        imp.scatter_(1, picks, 1e6)
                    local = {k: glob[k] + bad[k] for k in glob}
                    n = f"attacker-{i}"
                    msgs[n] = codecs[n].encode(glob, local, plan, imp, results[src.name].num_examples)
            if defended:
                agg = RobustAggregator(server.shapes, server.num_layers, server.num_heads, cfg.defense)
                agg.begin_round(server.global_state, plan)
            else:
                agg = server.aggregator(plan)
            for n in sorted(msgs):
                agg.add(n, server.decode(pb.ModelUpdate.FromString(msgs[n].SerializeToString()), plan))
            server.finish_round(plan, agg.finish(), agg.importance())
        out = {"final_val_loss": self.val_loss(server.global_state)}
        if attack == "inflated_importance" and picks is not None:
            mask = server.plan().mask
            out["mask_heads_taken"] = int(mask.gather(1, picks).sum())
            out["mask_heads_attacked"] = int(picks.numel())
            out["mask_active_heads"] = int(mask.sum())
        return out


def run_attack_bench(cfg: AttackBenchConfig, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    b = _Bench(cfg)
    clean = b.run(0, None, False)
    clean_def = b.run(0, None, True)
    base = clean["final_val_loss"]
    log(f"clean: val {base:.4f}; with the defence ({cfg.defense.kind}): {clean_def['final_val_loss']:.4f}")
    cells = []
    for f in cfg.attackers:
        for attack in cfg.attacks:
            row = {"attackers": f, "fraction": f / (cfg.honest + f), "attack": attack}
            for defended in (False, True):
                res = b.run(f, attack, defended)
                key = "defended" if defended else "undefended"
                row[key] = {**res, "ratio_to_clean": res["final_val_loss"] / base,
                            "within_5pct": res["final_val_loss"] <= 1.05 * base}
            cells.append(row)
            log(f"f={f} {attack:20s} none {row['undefended']['final_val_loss']:.4f}  "
                f"{cfg.defense.kind} {row['defended']['final_val_loss']:.4f}  "
                f"({row['defended']['ratio_to_clean']:.3f} x clean)")
    required = [c for c in cells if c["fraction"] <= 0.2 + 1e-12]
    return {"config": cfg.model_dump(), "clean_val_loss": base, "clean_defended_val_loss": clean_def["final_val_loss"],
            "cells": cells, "all_defended_within_5pct_at_f_over_n_le_0.2":
                all(c["defended"]["within_5pct"] for c in required),
            "wall_seconds": time.time() - t0}


def register(app, bench) -> None:
    import typer

    @bench.command("attacks")
    def attacks_cmd(
        json_path: Path = typer.Option(..., "--json", help="where to write the matrix"),
        quick: bool = typer.Option(False, "--quick", help="fewer rounds and local steps: minutes on 2 cores"),
        defense: str = typer.Option(None, "--defense", help="DefenseConfig as JSON (default: trimmed mean, trim 3)"),
        rounds: int = typer.Option(None, "--rounds", min=1, help="override the number of rounds"),
    ) -> None:
        """10 honest clients against f in {1, 2, 3} attackers (sign flip, scaled, Gaussian noise,
        ALIE, inflated importance): final validation loss with and without the defence."""
        cfg = quick_config() if quick else AttackBenchConfig()
        upd = {}
        if defense:
            try:
                upd["defense"] = DefenseConfig.model_validate_json(defense)
            except ValueError as e:
                raise typer.BadParameter(str(e), param_hint="--defense") from None
        if rounds:
            upd["rounds"] = rounds
        cfg = cfg.model_copy(update=upd)
        out = run_attack_bench(cfg, log=lambda s: typer.echo(s, err=True))
        json_path.write_text(json.dumps(out, indent=2))
        typer.echo(json.dumps({"clean_val_loss": out["clean_val_loss"],
                               "all_defended_within_5pct_at_f_over_n_le_0.2":
                                   out["all_defended_within_5pct_at_f_over_n_le_0.2"],
                               "wall_seconds": round(out["wall_seconds"], 1)}, indent=2))
