"""The ingest pool's threads run MKL (the low-rank products) on one thread each, for
themselves only (``coordinator.ingest.one_blas_thread``), and the products keep their bits."""

import ctypes
import os
import threading

import pytest
import torch

from fedmla.coordinator import ingest


def _mkl():
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return lib.MKL_Get_Max_Threads
    except (OSError, AttributeError):
        pytest.skip("torch does not link MKL here")


def _in_thread(fn):
    out = {}

    def run():
        out["v"] = fn()
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["v"]


def test_one_blas_thread_bounds_the_calling_thread_only():
    threads = _mkl()
    before = threads()
    assert _in_thread(lambda: (ingest.one_blas_thread(), threads())) == (True, 1)
    assert threads() == before                    # the other threads keep theirs
    assert _in_thread(threads) == before          # and so do threads started later


def test_the_bound_outlives_torchs_own_setup_of_the_thread():
    """Once the process has called torch.set_num_threads, torch sets MKL's count of each
    new thread to its own the first time the thread asks for it (its first parallel op):
    the bound is set after that, so it holds through the thread's torch calls."""
    threads = _mkl()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    x = torch.randn(1 << 20)
    try:
        after = _in_thread(lambda: (ingest.one_blas_thread(), torch.aminmax(x), threads())[2])
    finally:
        torch.set_num_threads(before)
    assert after == 1


def test_products_on_one_blas_thread_have_the_bits_of_the_default():
    _mkl()
    g = torch.Generator().manual_seed(0)
    # the small preset's factor shapes and larger ones, ranks up to past the sizes MKL splits
    cases = [(torch.randn(r, m, generator=g), torch.randn(r, n, generator=g))
             for m, n in [(768, 256), (256, 768), (512, 64), (2048, 512), (1000, 1000)]
             for r in (1, 12, 64, 300)]
    ref = [a.t() @ b for a, b in cases]

    def bounded():
        ingest.one_blas_thread()
        return [a.t() @ b for a, b in cases]
    for (a, b), x, y in zip(cases, ref, _in_thread(bounded)):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32)), (tuple(a.shape), tuple(b.shape))


def test_the_ingest_pool_threads_run_blas_on_one_thread(coordinator):
    threads = _mkl()
    pool = coordinator.coord.ingest.pool
    assert {pool.submit(threads).result() for _ in range(8)} == {1}
