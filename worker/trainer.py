"""The one local trainer: the gRPC worker, Ray actors and the Flower ClientApp all call it.

:meth:`LocalTrainer.train` takes the global weights, runs H local AdamW steps on one
client's data and returns the new local weights, the client's head importance (from the
per-head gate gradients of those same steps), its metrics and its example count.
Everything random (batch offsets) comes from a generator seeded by
``(seed, client, round)``, so a run is reproducible from its seed.

The learning-rate schedule (linear warm-up, then cosine to ``min_lr_ratio * lr``) runs
over *global* step numbers (``start_step`` + local step), so federated rounds continue
one schedule rather than restarting it every round. AdamW state is fresh each round:
clients are stateless between rounds, which is what sampling clients requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedmla.mla_model import HeadImportance, MLAConfig, MLATransformer
from fedmla.mla_model import init_global_state  # noqa: F401  (re-export: it lives with the model now)
from fedmla.protos.seeds import derive_seed

from .data import ClientData


class TrainerConfig(BaseModel):
    """Local training knobs (per round: ``local_steps`` optimiser steps of ``batch_size`` sequences)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_steps: int = Field(20, gt=0, description="H: optimiser steps per round")
    batch_size: int = Field(8, gt=0, description="sequences per step")
    seq_len: int = Field(64, gt=0, description="tokens per sequence (plus one target)")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: int = Field(20, ge=0, description="global steps of linear warm-up")
    total_steps: int = Field(1000, gt=0, description="global step at which the cosine reaches its floor")
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")
    autocast: Literal["off", "bf16"] = Field("off", description="bf16 autocast; off by default on CPU (see README)")
    importance: bool = Field(True, description="accumulate per-head gate gradients during training")
    eval_batch_size: int = Field(64, gt=0)
    seed: int = 0


@dataclass
class TrainResult:
    """What a client hands to the codec after a round."""

    state: dict[str, torch.Tensor]        # new local weights (fp32, CPU, detached copies)
    importance: torch.Tensor | None       # (L, H) float32, normalised per layer; None if disabled
    num_examples: int                     # sequences trained on (local_steps * batch_size)
    metrics: dict[str, float] = field(default_factory=dict)


def lr_at(cfg: TrainerConfig, step: int) -> float:
    """Learning rate at global step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))



class LocalTrainer:
    """Owns one model instance (reused across clients and rounds to save allocation).

    Not thread-safe: give each concurrent client (Ray actor, thread) its own trainer.
    """

    def __init__(self, model_cfg: MLAConfig, cfg: TrainerConfig):
        if cfg.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.model = MLATransformer(model_cfg)

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.autocast == "bf16":
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                return self.model.loss(tokens)
        return self.model.loss(tokens)

    def train(self, global_state: dict[str, torch.Tensor], data: ClientData, round_idx: int = 0,
              start_step: int | None = None, client_key: str | None = None, seed: int | None = None) -> TrainResult:
        """Run ``local_steps`` steps from ``global_state`` on ``data``.

        ``start_step`` (default ``round_idx * local_steps``) places the steps on the global
        schedule; ``client_key`` (default the client's name) enters the batch seed, as does
        ``seed`` (default the config's).
        """
        cfg = self.cfg
        start = round_idx * cfg.local_steps if start_step is None else start_step
        data.check_vocab(self.model_cfg.vocab_size)
        self._load(global_state)
        model = self.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed if seed is None else seed, "batches", client_key or data.name, round_idx))
        tracker = HeadImportance(model) if cfg.importance else None
        losses, norms = [], []
        try:
            for i in range(cfg.local_steps):
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, start + i)
                batch = data.batch(cfg.batch_size, cfg.seq_len, gen)
                opt.zero_grad(set_to_none=True)
                loss = self._loss(batch)
                loss.backward()
                if tracker is not None:
                    tracker.accumulate()
                if cfg.grad_clip > 0:
                    norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
                opt.step()
                losses.append(float(loss.detach()))
            importance = tracker.scores() if tracker is not None else None
        finally:
            if tracker is not None:
                tracker.close()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        metrics = {"train_loss": sum(losses) / len(losses), "train_loss_last": losses[-1],
                   "lr_last": lr_at(cfg, start + cfg.local_steps - 1)}
        if norms:
            metrics["grad_norm_mean"] = sum(norms) / len(norms)
        return TrainResult(state=state, importance=importance,
                           num_examples=cfg.local_steps * cfg.batch_size, metrics=metrics)

    @torch.no_grad()
    def evaluate(self, state: dict[str, torch.Tensor], windows: torch.Tensor) -> dict[str, float]:
        """Mean next-token loss over windows (V, T+1) int64, plus perplexity and bits per byte.

        Tokens are bytes, so bits per byte = loss / ln 2. Always fp32 (no autocast) so that
        evaluations compare across runs.
        """
        if windows.dim() != 2 or windows.size(0) == 0:
            raise ValueError(f"evaluation windows must be a non-empty (V, T+1) tensor, got {tuple(windows.shape)}")
        if int(windows.max()) >= self.model_cfg.vocab_size:
            raise ValueError(f"evaluation windows hold token id {int(windows.max())}, past the model's vocab_size "
                             f"{self.model_cfg.vocab_size}")
        self._load(state)
        model = self.model
        model.eval()
        total, count = 0.0, 0
        for s in range(0, windows.size(0), self.cfg.eval_batch_size):
            chunk = windows[s: s + self.cfg.eval_batch_size].long()
            n = chunk.size(0) * (chunk.size(1) - 1)
            total += float(model.loss(chunk)) * n
            count += n
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": loss / math.log(2)}
