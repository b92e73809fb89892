"""Seed derivation shared by every party: one function, so that the coordinator, the
workers and the benchmarks draw the same random numbers for the same purpose."""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed from printable parts (joined by '/'), stable across processes and machines."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
