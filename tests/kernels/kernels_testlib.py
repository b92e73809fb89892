"""Helpers shared by the kernel tests."""

import os

import torch

DEVICE = os.environ.get("FEDMLA_TEST_DEVICE", "cpu")


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the kernel tests' device."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (absolute when e is all zero, e.g. a gradient that must vanish)."""
    a, e = actual.detach().float(), expected.detach().float()
    denom = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / denom if denom > 1e-6 else diff
