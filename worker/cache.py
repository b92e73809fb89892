"""The per-process cache of pure results shared by the virtual clients of one process
(see :class:`ComputeCache`), and the digests its keys are made of."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch


def bytes_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def with_model_hash(state: dict[str, torch.Tensor], shared) -> tuple:
    """(state, shared, the model hash of state)."""
    from fedmla.protos.weights import model_hash
    return state, shared, model_hash(state)


class ComputeCache:
    """Results of costly, pure steps shared by the virtual clients of one process.

    A value is a function of its key alone (the key names everything the computation
    reads: the bytes downloaded, by digest, and the version and hash of the model they
    apply to), so a client that takes a cached value holds the same bits it would have
    computed; the hash check against the coordinator's version is made on the result as
    before. Cached values are shared, never written to: the protocol replaces a worker's
    state, it does not modify it. Local trainers are reused per thread (they own one
    model instance and build a fresh optimizer for every round). ``max_entries`` bounds
    the memory: a run's clients mostly ask for the few latest versions.
    """

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._memo: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()
        self.hits = self.misses = 0

    def get(self, key, compute):
        """The value of ``key``, computed by ``compute()`` the first time (outside the lock:
        two threads may both compute it, with the same result). An exception caches nothing."""
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                self.hits += 1
                return self._memo[key]
        value = compute()
        with self._lock:
            self.misses += 1
            self._memo[key] = value
            while len(self._memo) > self.max_entries:
                self._memo.popitem(last=False)
        return value

    def trainer(self, key, make):
        """This thread's trainer for ``key`` (made by ``make()`` the first time)."""
        trainers = self._local.__dict__.setdefault("trainers", {})
        if key not in trainers:
            trainers.clear()                 # one model per thread: a new key replaces the old
            trainers[key] = make()
        return trainers[key]
