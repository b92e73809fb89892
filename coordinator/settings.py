"""Typed settings of a coordinator (pydantic-settings).

Sources, lowest priority first: defaults, environment (``FEDMLA_COORDINATOR_<FIELD>``),
the ``--config FILE`` (YAML, JSON or TOML), then command-line flags (``--<field-name>``).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedmla.protos.codec.config import CodecConfig
from .defenses import DefenseConfig
from .privacy import DPConfig

# Settings of the retired dense update mode, and what replaces each: a config, flag or
# store that still names one is refused with this hint.
RETIRED = {
    "updates": "the codec is the only pipeline; plain FedAvg is --codec fedavg, DiLoCo --codec diloco",
    "aggregator": "aggregator plug-ins are gone: --codec fedavg for plain FedAvg, --defense for robust "
                  "aggregation, --dp for DP-FedAvg",
    "server_lr": "use codec.outer_lr", "rank": "use codec.rank", "max_rank": "use codec.rank (the bound is the "
    "codec's own rank)", "quant_bits": "use codec.factor_bits", "keep_ratio": "use codec.keep_ratio",
    "random_heads": "use codec.explore_heads", "codec_extra": "use the codec's own fields (codec.*)",
}
CODEC_PRESETS = {"default": CodecConfig, "fedavg": CodecConfig.fedavg, "diloco": CodecConfig.diloco}


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDMLA_COORDINATOR_", extra="forbid")

    # ---- network -------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to bind the gRPC server to")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    port_file: Path | None = Field(None, description="write the bound gRPC port to this file once serving")
    tls_cert: Path | None = Field(None, description="server certificate (PEM); enables TLS")
    tls_key: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca: Path | None = Field(None, description="CA (PEM) that client certificates must chain to; enables mutual TLS")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus metrics HTTP port (unset: off)")
    metrics_host: str = Field("127.0.0.1", description="address of the metrics HTTP server")
    dashboard_port: int | None = Field(None, ge=0, le=65535, description=(
        "serve the read-only web dashboard of this run on this HTTP port (0: any free port; unset: off)"))
    dashboard_host: str = Field("127.0.0.1", description="address of the dashboard HTTP server")
    dashboard_token: str | None = Field(None, min_length=1, description=(
        "token the dashboard requires on the page and API (Bearer header or ?token=); never stored or shown. "
        "Prefer the environment variable FEDMLA_COORDINATOR_DASHBOARD_TOKEN to a flag"))
    max_concurrent_uploads: int = Field(8, ge=1, description=(
        "updates read and validated at once; others wait. A slot is taken when an upload's first chunk "
        "arrives, and each client has at most one upload in flight"))
    upload_idle_timeout_s: float = Field(30.0, gt=0, description=(
        "an upload stream that sends no chunk for this long (the first one included) is ended with "
        "DEADLINE_EXCEEDED; the round's deadline ends any stream still open, whatever it sends"))
    upload_memory_budget_bytes: int = Field(0, ge=0, description=(
        "memory all uploads in flight may hold together (received bytes, the parsed message and the decoded "
        "tensors, reserved when the header arrives at 2x the announced size plus 4 bytes per decoded "
        "element of the round's plan); an upload that does not fit waits, bounded by the idle timeout. "
        "0 (default): room for two fp32 updates of the whole model at once, at least 256 MiB"))
    max_num_examples: int = Field(1_000_000, ge=1, description=(
        "largest example count an update may report (its weight in the mean); larger counts are refused"))
    max_weight_multiple: float = Field(10.0, ge=1, description=(
        "a client's weight in the round's mean is at most this multiple of the median example count of "
        "the round's replies, so one client cannot carry the mean with an inflated count"))
    max_metrics: int = Field(32, ge=0, le=4096, description="metrics entries an update may carry")
    max_metric_name_chars: int = Field(64, ge=1, le=1024, description="longest metric name an update may carry")
    shutdown_grace_s: float = Field(5.0, ge=0, description="time in-flight calls get on SIGTERM")
    # ---- store and model -----------------------------------------------------------
    store: Path = Field(Path("runs/coordinator"), description="store directory (SQLite + checkpoints)")
    preset: str = Field("tiny", description="MLA model preset of a new run")
    model_dir: Path | None = Field(None, description=(
        "start from this Hugging Face DeepSeek-V2/V3 checkpoint folder (config.json, *.safetensors, optional "
        "tokenizer.json) instead of a preset; a resumed run finds the model in its store"))
    init_seed: int = Field(0, description="seed of the initial global model")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept on disk (older ones are deleted)")
    # ---- rounds ----------------------------------------------------------------------
    seed: int = Field(0, description="seed of client sampling, head masks and task seeds")
    rounds: int = Field(0, ge=0, description="stop after this many committed rounds (0: run until stopped)")
    clients_per_round: int = Field(2, ge=1, description="clients sampled per round")
    min_clients: int = Field(0, ge=0, description="joined clients needed to open a round (0: clients_per_round)")
    min_replies: int = Field(1, ge=1, description="replies needed to commit a round")
    round_timeout_s: float = Field(60.0, gt=0, description="deadline of a round after it opens")
    client_timeout_s: float = Field(120.0, gt=0, description="a client silent this long is inactive (a dropout if sampled)")
    heartbeat_interval_s: float = Field(10.0, gt=0)
    task_long_poll_s: float = Field(15.0, ge=0, le=50, description=(
        "GetTask holds a 'wait' answer up to this long, returning early when a round opens or the run "
        "ends, so idle clients neither poll hard nor start late (0: answer at once); never longer than half "
        "client_timeout_s (virtual clients send no heartbeat while their GetTask is held)"))
    # ---- what workers send -------------------------------------------------------------
    codec: CodecConfig = Field(default_factory=CodecConfig, description=(
        "the update codec's config: a preset name ('default'; 'fedavg' = plain FedAvg, fp32 dense both ways; "
        "'diloco' = the same with DiLoCo's outer Nesterov step) or a JSON object of fedmla.protos.codec."
        "CodecConfig fields (e.g. '{\"rank\": 8, \"keep_ratio\": 0.5}'); fixed for the life of a store"))
    defense: DefenseConfig = Field(default_factory=DefenseConfig, description=(
        "robust aggregation against hostile clients (JSON object of fedmla.coordinator.defenses."
        "DefenseConfig, e.g. '{\"kind\": \"median\"}' or '{\"kind\": \"krum\", \"byzantine\": 2}'); by "
        "default the exact mean, refusing only updates whose norm is 1e6 x the round's median"))
    dp: DPConfig | None = Field(None, description=(
        "client-level differential privacy (JSON object of fedmla.coordinator.privacy.DPConfig: clip_norm, "
        "noise_multiplier, target_epsilon, delta); a round that would exceed target_epsilon is not started"))
    keep_downlinks: int = Field(64, ge=1, description=(
        "codec downlinks kept so that a worker k <= this many versions behind catches up with them "
        "instead of a full download"))
    # ---- task sent to workers ------------------------------------------------------------
    local_steps: int = Field(10, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(64, ge=1)
    hyper_extra: dict[str, str] = Field(default_factory=dict, description="extra hyperparameters (JSON object)")
    max_update_bytes: int = Field(64 << 20, ge=1024, description="largest serialized update accepted")

    @model_validator(mode="before")
    @classmethod
    def _refuse_retired(cls, data: Any) -> Any:
        if isinstance(data, dict):
            named = sorted(k for k in data if k in RETIRED)
            if named:
                raise ValueError("retired setting(s) of the dense update mode: " +
                                 "; ".join(f"{k} ({RETIRED[k]})" for k in named))
        return data

    @field_validator("codec", mode="before")
    @classmethod
    def _codec_preset(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.lstrip().startswith("{"):
            if v not in CODEC_PRESETS:
                raise ValueError(f"unknown codec preset {v!r}: use one of {sorted(CODEC_PRESETS)} or a JSON object")
            return CODEC_PRESETS[v]()
        return v

    @model_validator(mode="after")
    def _check(self) -> "CoordinatorSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("mutual TLS (tls_client_ca) needs tls_cert and tls_key")
        if self.dp is not None and self.defense.kind != "none":
            raise ValueError(f"choose differential privacy (dp) or a robust defense (kind {self.defense.kind!r}), "
                             f"not both: DP's clipping and noise assume the plain mean")
        if self.model_dir is not None and "preset" in self.model_fields_set:
            raise ValueError("give either preset or model_dir (--model): a checkpoint brings its own model config")
        if self.min_replies > self.clients_per_round:
            raise ValueError(f"min_replies {self.min_replies} exceeds clients_per_round {self.clients_per_round}")
        return self

    def public_json(self) -> str:
        """The settings as recorded in the store and shown on the dashboard: no secrets."""
        return self.model_dump_json(exclude={"dashboard_token"})

    @property
    def clients_to_start(self) -> int:
        return self.min_clients or self.clients_per_round


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings mapping in a YAML, JSON or TOML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e}") from None
    if path.suffix in (".toml",):
        data = tomllib.loads(text)
    elif path.suffix in (".json",):
        data = json.loads(text)
    else:
        import yaml
        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    section = data.get("coordinator", data)
    return {k.replace("-", "_"): v for k, v in section.items()}


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> CoordinatorSettings:
    """Settings from a file with flag overrides (``None`` overrides are ignored)."""
    values = read_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CoordinatorSettings(**values)
