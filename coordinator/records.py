"""The rows the coordinator's store reads and writes (see :mod:`.store`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelRecord:
    version: int
    round_id: int | None
    path: Path
    sha256: str
    codec_path: Path | None = None      # the codec's coordinator state at this version (codec runs)
    codec_sha256: str | None = None


@dataclass
class ClientRoundRecord:
    client: str
    status: str                      # replied | dropped | rejected
    bytes_up: int = 0
    bytes_down: int = 0
    local_loss: float | None = None
    num_examples: int = 0
    rejection_reason: str | None = None
    metrics: dict | None = None


@dataclass
class RoundRecord:
    id: int
    status: str                      # committed | failed
    model_version: int
    base_version: int
    started_at: float
    ended_at: float
    sampled: int
    replied: int
    dropped: int
    rejected: int
    train_loss: float | None = None
    val_loss: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    fedavg_fp32_bytes: int = 0
    aggregation_s: float = 0.0
    reason: str = ""
