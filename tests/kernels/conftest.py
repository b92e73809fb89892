"""Kernel tests run every Triton kernel on the CPU through the Triton interpreter.

TRITON_INTERPRET must be set before a kernel is decorated by ``@triton.jit``; the kernel
modules are imported lazily by the public functions, so setting it here, at conftest
import time (before any test module is collected), is enough.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

_compiled = [m for m in ("fedmla.kernels.mla_attention.triton", "fedmla.kernels.mla_decode.triton", "fedmla.kernels.quant.triton")
             if m in sys.modules]
if _compiled:
    raise RuntimeError(f"{_compiled} were imported before TRITON_INTERPRET=1 was set; the kernel tests "
                       "would not run in the interpreter")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
