"""What the dashboard shows, computed from a source's records by pure functions.

The JSON API returns exactly these models and the page draws exactly these numbers,
so a script reading the API sees what the operator sees.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field

from .source import ClientRecord, ClientRoundRecord, DashboardSource, HeadImportanceRecord, RoundRecord, RunRecord

# exp() of a loss above this overflows a float; such a perplexity is reported as null.
_MAX_LOG_PERPLEXITY = 700.0


def perplexity(loss: float | None) -> float | None:
    """exp(loss) for a loss in nats per token; None when unknown, not finite or overflowing."""
    if loss is None or not math.isfinite(loss) or loss > _MAX_LOG_PERPLEXITY:
        return None
    return math.exp(loss)


def _ratio(reference: int | None, actual: int) -> float | None:
    if reference is None or actual <= 0:
        return None
    return reference / actual


def _finite(x: float | None) -> float | None:
    """JSON has no NaN or infinity: a diverged loss is shown as unknown, not as a crash."""
    return x if x is not None and math.isfinite(x) else None


class RoundView(RoundRecord):
    """A round with what the dashboard derives from it and from the rounds before it."""

    duration_seconds: float | None = Field(None, description="ended_at - started_at; unset while the round runs")
    train_perplexity: float | None = Field(None, description="exp(train_loss)")
    val_perplexity: float | None = Field(None, description="exp(val_loss)")
    bytes_total: int = Field(0, description="bytes_up + bytes_down")
    cum_bytes_up: int = Field(0, description="bytes_up summed over this and all earlier rounds")
    cum_bytes_down: int = Field(0, description="bytes_down summed over this and all earlier rounds")
    cum_bytes_total: int = 0
    cum_fedavg_fp32_bytes: int | None = Field(None, description="fedavg_fp32_bytes summed so far; unset if any round lacks it")
    fedavg_ratio: float | None = Field(None, description="fedavg_fp32_bytes / bytes_up: how many times fewer bytes the clients "
                                                          "sent up than FedAvg in fp32 would have")
    cum_fedavg_ratio: float | None = Field(None, description="cum_fedavg_fp32_bytes / cum_bytes_up: the running ratio")
    fedavg_fp32_bytes_down: int | None = Field(None, description=(
        "bytes FedAvg in fp32 would have sent down: the fp32 model to every sampled client (the model size is "
        "fedavg_fp32_bytes / replied of this round or, with no replies, of the latest round before it)"))
    cum_fedavg_fp32_bytes_total: int | None = Field(None, description="FedAvg fp32 up + down summed so far")
    total_fedavg_ratio: float | None = Field(None, description=(
        "(fedavg_fp32_bytes + fedavg_fp32_bytes_down) / bytes_total: fewer bytes both ways, catch-up included"))
    cum_total_fedavg_ratio: float | None = Field(None, description=(
        "cum_fedavg_fp32_bytes_total / cum_bytes_total: the running ratio on total bytes (the headline figure)"))


def round_views(rounds: list[RoundRecord]) -> list[RoundView]:
    """Derive durations, perplexities, cumulative bytes and FedAvg ratios; input sorted by id.

    Two FedAvg references: uplink only (what the replying clients would have sent up,
    ``fedavg_ratio``) and total (that, plus the fp32 model sent to every sampled client,
    ``total_fedavg_ratio``), against every byte the round moved, catch-up downloads included.
    """
    out: list[RoundView] = []
    up = down = 0
    fedavg: int | None = 0
    fedavg_total: int | None = 0
    model_bytes: int | None = None      # fp32 bytes of the model, from the latest round with replies
    for r in rounds:
        up += r.bytes_up
        down += r.bytes_down
        fedavg = None if fedavg is None or r.fedavg_fp32_bytes is None else fedavg + r.fedavg_fp32_bytes
        if r.fedavg_fp32_bytes and r.replied:
            model_bytes = r.fedavg_fp32_bytes // r.replied
        fedavg_down = None if model_bytes is None or r.fedavg_fp32_bytes is None else r.sampled * model_bytes
        round_total_ref = None if fedavg_down is None else r.fedavg_fp32_bytes + fedavg_down
        fedavg_total = None if fedavg_total is None or round_total_ref is None else fedavg_total + round_total_ref
        total = r.bytes_up + r.bytes_down
        duration = None
        if r.started_at is not None and r.ended_at is not None:
            duration = max(0.0, r.ended_at - r.started_at)
        fields = r.model_dump()
        fields["train_loss"], fields["val_loss"] = _finite(r.train_loss), _finite(r.val_loss)
        out.append(RoundView(
            **fields,
            duration_seconds=duration,
            train_perplexity=perplexity(r.train_loss),
            val_perplexity=perplexity(r.val_loss),
            bytes_total=total,
            cum_bytes_up=up,
            cum_bytes_down=down,
            cum_bytes_total=up + down,
            cum_fedavg_fp32_bytes=fedavg,
            fedavg_ratio=_ratio(r.fedavg_fp32_bytes, r.bytes_up),
            cum_fedavg_ratio=_ratio(fedavg, up),
            fedavg_fp32_bytes_down=fedavg_down,
            cum_fedavg_fp32_bytes_total=fedavg_total,
            total_fedavg_ratio=_ratio(round_total_ref, total),
            cum_total_fedavg_ratio=_ratio(fedavg_total, up + down),
        ))
    return out


class ClientView(ClientRecord):
    """A client with its part in the latest round it joined."""

    last_round: int | None = Field(None, description="latest round this client took part in")
    local_loss: float | None = Field(None, description="local training loss in last_round")
    num_examples: int | None = Field(None, description="examples trained on in last_round")
    rejection_reason: str | None = Field(None, description="why last_round's update was rejected, if it was")


def client_views(clients: list[ClientRecord], latest: list[ClientRoundRecord]) -> list[ClientView]:
    by_name = {row.client: row for row in latest}
    out = []
    for c in clients:
        row = by_name.get(c.name)
        out.append(ClientView(
            **c.model_dump(),
            last_round=row.round_id if row else None,
            local_loss=_finite(row.local_loss) if row else None,
            num_examples=row.num_examples if row else None,
            rejection_reason=row.rejection_reason if row else None,
        ))
    return out


class ModelSummary(BaseModel):
    """Sizes of the run's MLA model (from :func:`mla_model.cli.model_info`)."""

    parameters: int
    kv_cache_bytes_per_token: int = Field(description="latent + rope key per token over all layers")
    element_size: int = Field(description="bytes per cached element assumed for the KV-cache figure")
    mha_parameters: int = Field(description="a multi-head attention model of the same width and heads")
    mha_kv_cache_bytes_per_token: int
    kv_cache_ratio: float = Field(description="MLA cache / MHA cache")
    n_layers: int
    n_heads: int
    dim: int
    kv_lora_rank: int


class RunView(BaseModel):
    run_id: str
    schema_version: int | None = None
    created_at: float | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    mla_config: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = Field(None, description="differential privacy spent and its budget (DP runs)")
    model: ModelSummary | None = Field(None, description="present when the run records a valid model config")
    model_error: str | None = Field(None, description="why the model summary is missing although a model config is present")


_MODEL_KEYS = ("model", "model_config", "mla")


def find_model_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The model section of a run config: under ``model`` (or ``model_config``/``mla``),
    either MLAConfig fields or ``{"preset": name, **overrides}``."""
    for key in _MODEL_KEYS:
        section = config.get(key)
        if isinstance(section, dict):
            return section
    return None


def model_summary(section: dict[str, Any], element_size: int = 2) -> ModelSummary:
    """Raises ValueError (pydantic's ValidationError is one) for an invalid model config."""
    # Imported here: mla_model pulls in torch, which only runs with a model config need.
    from fedmla.mla_model.cli import model_info
    from fedmla.mla_model.config import MLAConfig

    fields = dict(section)
    preset = fields.pop("preset", None)
    cfg = MLAConfig.preset(preset, **fields) if preset is not None else MLAConfig(**fields)
    info = model_info(cfg, element_size)
    return ModelSummary(
        parameters=info["mla"]["parameters"], kv_cache_bytes_per_token=info["mla"]["kv_cache_bytes_per_token"],
        element_size=element_size, mha_parameters=info["mha"]["parameters"],
        mha_kv_cache_bytes_per_token=info["mha"]["kv_cache_bytes_per_token"], kv_cache_ratio=info["kv_cache_ratio"],
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, dim=cfg.dim, kv_lora_rank=cfg.kv_lora_rank,
    )


def run_view(run: RunRecord) -> RunView:
    view = RunView(**run.model_dump())
    section = run.mla_config if run.mla_config is not None else find_model_config(run.config)
    if section is not None:
        try:
            view.model = model_summary(section)
        except (ValueError, TypeError) as e:
            view.model_error = f"the run's model config is not a valid MLAConfig: {e}"
    return view


class HeadImportanceView(HeadImportanceRecord):
    scores: list[list[float | None]] = Field(description="scores[layer][head]; null where not finite")
    n_layers: int
    n_heads: int = Field(description="the widest layer; shorter rows are pruned layers")
    active_heads: int | None = Field(None, description="heads marked active in the mask")


def head_importance_view(rec: HeadImportanceRecord) -> HeadImportanceView:
    n_heads = max((len(row) for row in rec.scores), default=0)
    active = sum(sum(1 for m in row if m) for row in rec.mask) if rec.mask is not None else None
    fields = rec.model_dump()
    fields["scores"] = [[_finite(x) for x in row] for row in rec.scores]
    return HeadImportanceView(**fields, n_layers=len(rec.scores), n_heads=n_heads, active_heads=active)


class Summary(BaseModel):
    """The headline numbers of a run."""

    version: int = Field(description="the source's change counter when this was computed")
    run_id: str
    rounds_total: int
    rounds_ended: int
    current_round: int | None = Field(None, description="highest round id")
    current_status: str | None = None
    last_val_loss: float | None = Field(None, description="validation loss of the latest round that has one")
    last_val_perplexity: float | None = None
    last_train_loss: float | None = None
    best_val_loss: float | None = None
    cum_bytes_up: int = 0
    cum_bytes_down: int = 0
    cum_fedavg_fp32_bytes: int | None = None
    cum_fedavg_ratio: float | None = Field(None, description="FedAvg fp32 up / bytes up, so far")
    cum_fedavg_fp32_bytes_total: int | None = Field(None, description="FedAvg fp32 up + down, so far")
    cum_total_fedavg_ratio: float | None = Field(None, description="FedAvg fp32 up + down / bytes up + down, so far")
    clients_total: int = 0
    clients_by_status: dict[str, int] = Field(default_factory=dict)


def summary(version: int, run: RunRecord, rounds: list[RoundView], clients: list[ClientRecord]) -> Summary:
    vals = [r for r in rounds if r.val_loss is not None]
    trains = [r for r in rounds if r.train_loss is not None]
    by_status: dict[str, int] = {}
    for c in clients:
        by_status[c.status] = by_status.get(c.status, 0) + 1
    last = rounds[-1] if rounds else None
    return Summary(
        version=version, run_id=run.run_id,
        rounds_total=len(rounds), rounds_ended=sum(1 for r in rounds if r.ended_at is not None),
        current_round=last.id if last else None, current_status=last.status if last else None,
        last_val_loss=vals[-1].val_loss if vals else None,
        last_val_perplexity=vals[-1].val_perplexity if vals else None,
        last_train_loss=trains[-1].train_loss if trains else None,
        best_val_loss=min(r.val_loss for r in vals) if vals else None,
        cum_bytes_up=last.cum_bytes_up if last else 0, cum_bytes_down=last.cum_bytes_down if last else 0,
        cum_fedavg_fp32_bytes=last.cum_fedavg_fp32_bytes if last else None,
        cum_fedavg_ratio=last.cum_fedavg_ratio if last else None,
        cum_fedavg_fp32_bytes_total=last.cum_fedavg_fp32_bytes_total if last else None,
        cum_total_fedavg_ratio=last.cum_total_fedavg_ratio if last else None,
        clients_total=len(clients), clients_by_status=by_status,
    )


# Ended rounds change at most shortly after they end: an evaluator (``fedmla simulate``)
# records the held-out loss of the model a round produced once it has measured it. So
# the newest REVISABLE_ENDED ended rounds are sent again with every update.
REVISABLE_ENDED = 2


def open_frontier(rounds: list[RoundRecord]) -> int:
    """Smallest round id a client that has seen ``rounds`` must re-read on the next update:
    the first open round, else one past the last, but no later than the newest
    ``REVISABLE_ENDED`` ended rounds. Older ended rounds never change."""
    frontier = rounds[-1].id + 1 if rounds else 0
    for r in rounds:
        if r.ended_at is None:
            frontier = r.id
            break
    ended = [r.id for r in rounds if r.ended_at is not None]
    if ended:
        frontier = min(frontier, ended[-REVISABLE_ENDED:][0])
    return frontier


class LiveUpdate(BaseModel):
    """One server-sent event: the page's whole state, with rounds since ``rounds_from``."""

    version: int
    full: bool = Field(description="True for the first event of a stream: rounds holds every round")
    rounds_from: int = Field(description="rounds holds every round with id >= rounds_from")
    summary: Summary
    run: RunView
    rounds: list[RoundView]
    clients: list[ClientView]
    head_importance_rounds: list[int]
    head_importance: HeadImportanceView | None = Field(None, description="the latest round's head importance")


def live_update(source: DashboardSource, rounds_from: int | None, run: RunView | None = None) -> tuple[LiveUpdate, int]:
    """Build an event from the source; returns it and the ``rounds_from`` for the next one."""
    version = source.version()  # read first: a change after this makes the next poll send again
    rounds = round_views(source.rounds())
    clients = source.clients()
    hi_rounds = source.head_importance_rounds()
    latest = source.head_importance(hi_rounds[-1]) if hi_rounds else None
    record = source.run()
    start = 0 if rounds_from is None else rounds_from
    update = LiveUpdate(
        version=version, full=rounds_from is None, rounds_from=start,
        summary=summary(version, record, rounds, clients),
        run=run if run is not None else run_view(record),
        rounds=[r for r in rounds if r.id >= start],
        clients=client_views(clients, source.latest_client_rounds()),
        head_importance_rounds=hi_rounds,
        head_importance=head_importance_view(latest) if latest else None,
    )
    return update, open_frontier(rounds)
