"""The ingest pool runs torch on one intra-op thread; the low-rank products it forms are
the same bits as on torch's default thread count, and other threads keep that count."""

import threading

import torch

from fedmla.coordinator.ingest import single_threaded_pool
from fedmla.mla_model import MLAConfig
from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.worker.trainer import init_global_state


def _update(model, cfg, seed: int):
    state = init_global_state(model, 0)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    server = ServerCodec(model, cfg, state)
    plan = server.plan()
    g = torch.Generator().manual_seed(seed)
    local = {n: t + torch.randn(t.shape, generator=g) * 1e-2 for n, t in state.items()}
    msg = ClientCodec(model, cfg, shapes, "c").encode(state, local, plan, torch.rand(model.n_layers, model.n_heads,
                                                                                     generator=g), 10, {})
    return server.decode(pb.ModelUpdate.FromString(msg.SerializeToString()), plan)


def test_pool_threads_use_one_torch_thread_and_the_caller_keeps_its_count():
    before = torch.get_num_threads()
    pool = single_threaded_pool(2, "t-ingest")
    try:
        names = set()
        barrier = threading.Barrier(2)

        def probe():
            barrier.wait(10)              # both jobs at once: both threads answer
            names.add(threading.current_thread().name)
            return torch.get_num_threads()
        assert [f.result() for f in [pool.submit(probe) for _ in range(2)]] == [1, 1]
        assert len(names) == 2
        assert torch.get_num_threads() == before
        # a thread started afterwards takes the caller's count, not the pool's
        later = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [before]
    finally:
        pool.shutdown()


def test_products_on_the_pool_equal_the_default_thread_count_bit_for_bit():
    # the small preset: tensors large enough for MKL to split a product across threads
    model = MLAConfig.preset("small")
    update = _update(model, CodecConfig(), seed=3)
    here = {n: p.product() for n, p in update.tensors.parts.items()}
    pool = single_threaded_pool(1, "t-products")
    try:
        there = pool.submit(lambda: {n: p.product() for n, p in update.tensors.parts.items()}).result()
    finally:
        pool.shutdown()
    assert here.keys() == there.keys() and len(here) > 10
    assert any(p.left is not None for p in update.tensors.parts.values())
    for n in here:
        assert torch.equal(here[n].view(torch.int32), there[n].view(torch.int32)), n
