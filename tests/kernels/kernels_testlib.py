"""Helpers shared by the kernel tests."""

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (absolute when e is all zero, e.g. a gradient that must vanish)."""
    a, e = actual.detach().float(), expected.detach().float()
    denom = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / denom if denom > 1e-6 else diff
