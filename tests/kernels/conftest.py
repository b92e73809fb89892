"""Kernel tests run every Triton kernel on the device the suite chose (tests/conftest.py):
compiled on CUDA tensors when a GPU is present, in Triton's interpreter on CPU tensors
otherwise. Every tensor a kernel test makes lands on that device (default device and
generators), so the same tests prove the compiled kernels on a GPU without edits.

TRITON_INTERPRET must be set before a kernel is decorated by ``@triton.jit``; the kernel
modules are imported lazily by the public functions, so the root conftest sets it before
any test module is collected.
"""

import os
import sys

DEVICE = os.environ.get("FEDMLA_TEST_DEVICE", "cpu")

_compiled = [m for m in ("fedmla.kernels.mla_attention.triton", "fedmla.kernels.mla_decode.triton", "fedmla.kernels.quant.triton")
             if m in sys.modules]
if _compiled and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(f"{_compiled} were imported before TRITON_INTERPRET=1 was set; the kernel tests "
                       "would not run in the interpreter")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _on_kernel_device():
    """New tensors default to the suite's kernel device for the duration of each test."""
    torch.set_default_device(DEVICE)
    try:
        yield
    finally:
        torch.set_default_device("cpu")


@pytest.fixture
def gen():
    return torch.Generator(device=DEVICE).manual_seed(1234)
