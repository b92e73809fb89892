"""Catch-up: the cheapest exact payload that brings a worker to the coordinator's global.

A worker that was sampled before holds the version (the codec round) it last trained
from; a new or restarted one holds nothing. Three exact ways to reach version ``t``:

- ``chain``: the downlinks of versions ``v .. t-1`` replayed from what the worker holds;
- ``chain`` from the seed (``from_seed``): a worker that holds nothing rebuilds the
  seeded initial model (:func:`fedmla.mla_model.init_global_state`, version 0, no
  bytes) and replays every downlink ``0 .. t-1``. The replay also rebuilds the state
  that is a function of the downlinks (the replicated outer momentum, PowerSGD bases),
  so that state never travels;
- ``full``: the fp32 weights plus the codec's shared state (:mod:`.transfer`), which
  with ``replicate_momentum`` is about twice the model.

:func:`plan_catchup` (coordinator side) picks the smallest from the sizes alone;
:func:`catchup_payload` assembles it; :func:`apply_catchup` (worker side) applies it and
checks the model hash of the result against the coordinator's, whatever the path.
All three are pure functions of their arguments.

A lossy catch-up (a compressed delta to the current global) is deliberately not offered:
the worker would hold weights whose hash differs from everybody else's, and every later
downlink would be applied to the wrong base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from fedmla.mla_model import MLAConfig, init_global_state

from ..weights import model_hash
from .config import CodecConfig
from .layout import SharedState
from .transfer import apply_chain, decode_full_state
from .wire import TensorCodec, UpdateDecodeError

Kind = Literal["none", "chain", "full"]


class CatchupError(UpdateDecodeError):
    """A catch-up payload does not bring the worker to the announced version and hash."""


@dataclass(frozen=True)
class CatchupPlan:
    """What to send: ``kind``; for a chain the versions ``start .. target`` (``start`` is
    the held version, or 0 with ``from_seed``); ``bytes`` is the payload size."""

    kind: Kind
    start: int
    target: int
    bytes: int
    from_seed: bool = False

    @property
    def downlinks(self) -> int:
        return self.target - self.start if self.kind == "chain" else 0


def version_for_hash(held_hash: str | None, version_hashes: Sequence[str]) -> int | None:
    """The version a worker holds, from the hash it reports (``version_hashes[v]`` is the
    model hash of version v); None when it holds nothing or a hash we do not know (the
    latest version wins if two versions hash alike)."""
    if held_hash is None:
        return None
    for v in range(len(version_hashes) - 1, -1, -1):
        if version_hashes[v] == held_hash:
            return v
    return None


def plan_catchup(held: int | None, current: int, chain_sizes: Sequence[int | None], full_state_bytes: int,
                 seeded: bool = True) -> CatchupPlan:
    """The cheapest exact way from ``held`` (a version, or None: nothing) to ``current``.

    ``chain_sizes[i]`` is the serialized size of the downlink from version i to i+1
    (None: no longer stored); ``full_state_bytes`` the size of the full state at
    ``current``; ``seeded``: version 0 is the seeded initial model every worker can
    rebuild. Ties go to the chain (it needs no fp32 state on the coordinator's side).
    """
    if current < 0:
        raise ValueError(f"current version must be >= 0, got {current}")
    if held is not None and not 0 <= held <= current:
        raise ValueError(f"held version {held} is not in 0..{current}")
    if len(chain_sizes) < current:
        raise ValueError(f"{len(chain_sizes)} downlink sizes for version {current}")
    if full_state_bytes <= 0:
        raise ValueError(f"full_state_bytes must be positive, got {full_state_bytes}")
    if held == current:
        return CatchupPlan("none", current, current, 0)
    start, from_seed = (held, False) if held is not None else (0, True)
    best = CatchupPlan("full", current, current, int(full_state_bytes))
    if held is not None or seeded:
        sizes = chain_sizes[start:current]
        if all(s is not None for s in sizes):
            total = int(sum(sizes))
            if total <= best.bytes:
                best = CatchupPlan("chain", start, current, total, from_seed)
    return best


def catchup_payload(plan: CatchupPlan, chain: Sequence[bytes | None], full_state: Callable[[], bytes]
                    ) -> list[bytes] | bytes | None:
    """Coordinator side: the payload of ``plan``: the downlinks ``start .. target-1`` (a
    list), the full state (``full_state()``, encoded only when needed), or None."""
    if plan.kind == "none":
        return None
    if plan.kind == "full":
        return full_state()
    out = list(chain[plan.start:plan.target])
    if len(out) != plan.downlinks or any(raw is None for raw in out):
        raise ValueError(f"downlinks {plan.start}..{plan.target - 1} are not all stored")
    return out


def apply_catchup(plan: CatchupPlan, payload, held_state: dict[str, torch.Tensor] | None,
                  held_shared: SharedState | None, model_cfg: MLAConfig, codec_cfg: CodecConfig, seed: int,
                  expected_hash: str, tensors: TensorCodec | None = None,
                  initial_state: dict[str, torch.Tensor] | None = None
                  ) -> tuple[dict[str, torch.Tensor], SharedState]:
    """Worker side: (weights, shared state) at ``plan.target`` from what the worker holds
    and the payload, hash-checked against ``expected_hash``; raises :class:`CatchupError`.

    ``seed`` is the run's model seed (the seeded initial model of a chain ``from_seed``);
    a run that started from imported weights passes them as ``initial_state`` instead
    (version 0 is then those weights, which every worker of the run holds).
    """
    shapes = tensors.shapes if tensors is not None else None
    if plan.kind == "none":
        if held_state is None or held_shared is None:
            raise CatchupError("nothing to catch up from: the worker holds no model")
        state, shared = held_state, held_shared
    elif plan.kind == "full":
        if not isinstance(payload, (bytes, bytearray)):
            raise CatchupError("a full-state catch-up needs the serialized full state")
        if shapes is None:
            shapes = {n: tuple(t.shape) for n, t in init_global_state(model_cfg, seed).items()}
        state, shared = decode_full_state(bytes(payload), shapes)
    elif plan.kind == "chain":
        if plan.from_seed:
            state = ({n: v.clone() for n, v in initial_state.items()} if initial_state is not None
                     else init_global_state(model_cfg, seed))
            shapes = shapes or {n: tuple(t.shape) for n, t in state.items()}
            shared = SharedState.initial(shapes, codec_cfg)
        else:
            if held_state is None or held_shared is None:
                raise CatchupError("a chain from a held version needs the held model")
            state, shared = held_state, held_shared
            shapes = shapes or {n: tuple(t.shape) for n, t in state.items()}
        if shared.round != plan.start:
            raise CatchupError(f"the chain starts at version {plan.start}, the worker holds {shared.round}")
        if payload is None or len(payload) != plan.downlinks:
            raise CatchupError(f"expected {plan.downlinks} downlinks, got {0 if payload is None else len(payload)}")
        codec = tensors or TensorCodec(model_cfg, codec_cfg, shapes)
        state, shared = apply_chain(state, shared, list(payload), codec)
    else:
        raise CatchupError(f"unknown catch-up kind {plan.kind!r}")
    if shared.round != plan.target:
        raise CatchupError(f"catch-up ends at version {shared.round}, expected {plan.target}")
    got = model_hash(state)
    if got != expected_hash:
        raise CatchupError(f"after the {plan.kind} catch-up to version {plan.target} the model hash is "
                           f"{got[:12]}..., the coordinator's is {expected_hash[:12]}...")
    return state, shared
