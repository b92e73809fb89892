"""Helpers shared by the kernels: backend choice and argument checks.

Every public op takes ``backend``:

- ``"auto"``   CUDA tensors -> Triton; CPU tensors -> the fastest correct torch path.
- ``"triton"`` the Triton kernel on any device. On CPU tensors it needs the Triton
  interpreter (``TRITON_INTERPRET=1`` set before the kernel modules are imported);
  this is how the tests exercise the kernels without a GPU.
- ``"torch"``  the torch path that ``auto`` uses on CPU.
- ``"naive"``  the pure-torch reference (slow, explicit, for tests and benchmarks).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch", "naive")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_triton_device(t: torch.Tensor, kernel) -> None:
    """Raise a clear error when a CPU tensor meets a compiled (non-interpreted) kernel."""
    if t.device.type == "cuda":
        return
    if type(kernel).__name__ != "InterpretedFunction":
        raise ValueError(
            f"the Triton backend got {t.device.type} tensors but the kernels were compiled for a GPU; "
            "set TRITON_INTERPRET=1 before importing kernels to run them in the Triton interpreter"
        )


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def block_dim(n: int, minimum: int = 16) -> int:
    """Power-of-two tl.arange width covering n (masked beyond n); at least ``minimum`` so
    16-bit dots keep K >= 16 on a real GPU."""
    return max(next_pow2(n), minimum)


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, t, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")


def check_same(names: list[str], tensors: list[torch.Tensor], what: str = "dtype") -> None:
    vals = [getattr(t, what) for t in tensors]
    if any(v != vals[0] for v in vals[1:]):
        desc = ", ".join(f"{n}={v}" for n, v in zip(names, vals))
        raise ValueError(f"{', '.join(names)} must share one {what}; got {desc}")


def check_dim(name: str, t: torch.Tensor, axis: int, expected: int, label: str) -> None:
    if t.size(axis) != expected:
        raise ValueError(f"{name} has shape {tuple(t.shape)}: dimension {axis} ({label}) must be {expected}")


def normalize_heads(heads, n_heads: int, device: torch.device) -> torch.Tensor | None:
    """Active-head index list -> sorted unique int32 tensor on ``device`` (None = all heads)."""
    if heads is None:
        return None
    h = torch.as_tensor(heads).to(device="cpu").flatten()
    if h.numel() == 0:
        h = h.long()  # torch.as_tensor([]) is float32
    if h.dtype == torch.bool:
        if h.numel() != n_heads:
            raise ValueError(f"heads as a boolean mask needs {n_heads} entries, got {h.numel()}")
        h = h.nonzero().flatten()
    if h.is_floating_point():
        raise ValueError(f"heads must be integer head indices or a boolean mask, got dtype {h.dtype}")
    h = h.long()
    if h.numel() and (h.min() < 0 or h.max() >= n_heads):
        raise ValueError(f"heads must be indices in [0, {n_heads}), got {h.tolist()}")
    h = torch.unique(h)  # sorted
    if h.numel() == n_heads:
        return None
    return h.to(device=device, dtype=torch.int32)
