"""One BLAS thread for the exact sum's low-rank products, whoever calls the sum.

MKL's ``sgemm`` does not round every product the same way on one thread and on several:
a skinny term (e.g. 9 x 520 or 6 x 256 at rank 12, a few selected rows of a head-blocked
parameter) comes out with other last bits on two threads than on one. The coordinator's
ingest threads run MKL on one thread each, while a benchmark's or a Flower strategy's
aggregator runs on its main thread with the process's count: without a common bound,
the exact mean of the same updates could differ in the last bit between them, and
between machines with another number of cores. :func:`single_thread` bounds the calling
thread to one MKL thread while the sum forms its products (then restores what it had),
so every caller gets the one-thread bits. (The presets' shapes round alike on one and two
threads: no figure measured before this bound moved.)

``MKL_Set_Num_Threads_Local`` sets the count for the calling thread only (``torch.set_num_threads``
would set it for the whole process). Torch sets it too, once per thread: the first torch
call that asks for its thread count on a new thread sets MKL's local count to
``torch.get_num_threads()`` when the process has called ``torch.set_num_threads`` (a bound
set before that call was silently undone), so both helpers let torch do that first.
Without MKL (another BLAS) both are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import torch


@functools.cache
def _set_local_threads():
    """MKL's ``MKL_Set_Num_Threads_Local`` (int by value; the lower-case export is the
    Fortran form, which takes a pointer) from the MKL that torch links in, or None."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


def _one_thread(fn) -> int:
    """The calling thread's MKL count set to 1, after torch's own once-per-thread setting
    (see above); what it was before."""
    torch.get_num_threads()
    return fn(1)


def bound_calling_thread() -> bool:
    """Bound the calling thread's MKL calls to one thread from now on (for this thread
    only); True when it took effect."""
    fn = _set_local_threads()
    if fn is None:
        return False
    _one_thread(fn)
    return True


@contextlib.contextmanager
def single_thread():
    """The calling thread's MKL calls on one thread inside the block; its own setting
    (0: the process's) back after it."""
    fn = _set_local_threads()
    if fn is None:
        yield
        return
    previous = _one_thread(fn)
    try:
        yield
    finally:
        fn(previous)
