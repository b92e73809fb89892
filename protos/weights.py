"""Canonical bytes and version hash of a global model.

The canonical form of a state dict is ``safetensors.torch.save`` of its tensors
(contiguous, CPU, no metadata); the model version hash is the SHA-256 of those bytes.
A worker that reconstructs the weights itself serializes them the same way and
compares hashes; on a mismatch it downloads the full model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def canonical_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())})


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_hash(state: Mapping[str, torch.Tensor]) -> str:
    return sha256_hex(canonical_bytes(state))


def load_safetensors_bytes(data: bytes, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
                           what: str = "model") -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes (never pickle), optionally checked against
    ``expected`` {name: (shape, dtype)}; raises ValueError naming the mismatch."""
    try:
        state = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{what}: not valid safetensors data ({e})") from None
    if expected is not None:
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(f"{what}: tensor names differ from the model (missing {missing[:5]}, unexpected {extra[:5]})")
        for k, (shape, dtype) in expected.items():
            if tuple(state[k].shape) != tuple(shape) or state[k].dtype != dtype:
                raise ValueError(f"{what}: {k} is {tuple(state[k].shape)} {state[k].dtype}, expected {tuple(shape)} {dtype}")
    return state
