"""Crash-safe files of the store: a write leaves the old file or the new one, never a
mix (temporary file, fsync, rename, fsync of the directory), and a read is checked
against the SHA-256 the database recorded."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import StoreError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_tensors_atomic(path: Path, tensors: dict) -> str:
    """Write ``tensors`` as safetensors to ``path`` (crash-safe like :func:`write_atomic`)
    and return the SHA-256 of the file: the bytes are those of
    :func:`~fedmla.protos.weights.canonical_bytes` (the same dict, keys sorted), but go
    straight to the file instead of being assembled in memory first (safetensors'
    ``save`` holds two copies of a state, ``save_file`` one)."""
    from safetensors.torch import save_file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}, str(tmp))
    digest = hashlib.sha256()
    with open(tmp, "rb+") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return digest.hexdigest()


def read_verified(path: Path, sha256: str, what: str, version: int) -> bytes:
    """A file's bytes, checked against the SHA-256 the database recorded for it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StoreError(f"{what} of model version {version} unreadable at {path} ({e}); the store is damaged") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StoreError(f"{what} {path} does not match the SHA-256 recorded for model version {version}; the store "
                         f"is corrupt. Refusing to start from it")
    return data
