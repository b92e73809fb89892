import os

import pytest


def _kernel_device() -> str:
    """Where the kernel tests run, chosen once for the whole suite: compiled Triton on CUDA
    tensors when a CUDA device is present, Triton's interpreter on CPU tensors otherwise.
    FEDMLA_TEST_DEVICE=cpu|cuda forces either."""
    forced = os.environ.get("FEDMLA_TEST_DEVICE", "").strip().lower()
    if forced not in ("", "cpu", "cuda"):
        raise pytest.UsageError(f"FEDMLA_TEST_DEVICE must be 'cpu' or 'cuda', got {forced!r}")
    if forced:
        return forced
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


# On the CPU every Triton kernel runs in Triton's interpreter. This must be set before any
# module decorates a kernel with @triton.jit, and several packages (the codec's quantiser,
# the model's attention) import kernel modules, so it is set here, in the first conftest
# pytest loads. On CUDA the kernels are compiled (unless TRITON_INTERPRET is set by hand).
os.environ["FEDMLA_TEST_DEVICE"] = _kernel_device()
if os.environ["FEDMLA_TEST_DEVICE"] == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

# Tests share 2 cores with each other's subprocesses; keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow (full fault/fuzz variants)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow variant: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
