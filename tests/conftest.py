import os

import pytest

# Every Triton kernel in the suite runs in Triton's interpreter on CPU tensors. This must
# be set before any module decorates a kernel with @triton.jit, and several packages
# (the codec's quantiser, the model's attention) import kernel modules, so it is set
# here, in the first conftest pytest loads.
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
