"""ComputeCache: what virtual clients of one process share (fedmla.worker.runtime)."""

import threading

import pytest
import torch

from fedmla.mla_model import MLAConfig, init_global_state
from fedmla.protos.codec import CodecConfig, ServerCodec, SharedState
from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.transport import DownloadedModel, ModelIntegrityError
from fedmla.protos.weights import model_hash
from fedmla.worker.data import ClientData
from fedmla.worker.cache import ComputeCache
from fedmla.worker.runtime import WorkerOptions, WorkerProtocol


def test_cache_computes_once_bounds_its_entries_and_keeps_no_failure():
    cache, calls = ComputeCache(max_entries=2), []

    def compute(v):
        calls.append(v)
        return [v]
    first = cache.get("a", lambda: compute(1))
    assert cache.get("a", lambda: compute(2)) is first and calls == [1]
    with pytest.raises(ValueError):
        cache.get("b", lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert cache.get("b", lambda: compute(3)) == [3]          # the failure was not kept
    cache.get("c", lambda: compute(4))                          # evicts "a", the least recently used
    assert cache.get("a", lambda: compute(5)) == [5] and calls == [1, 3, 4, 5]


def test_cache_gives_each_thread_its_own_trainer():
    cache, made = ComputeCache(), []

    def make():
        made.append(object())
        return made[-1]
    mine = cache.trainer("k", make)
    assert cache.trainer("k", make) is mine
    other = {}
    t = threading.Thread(target=lambda: other.setdefault("t", cache.trainer("k", make)))
    t.start()
    t.join()
    assert other["t"] is not mine and len(made) == 2
    assert cache.trainer("k2", make) is not mine                 # new hyper-parameters, new trainer


def _worker(tmp_path, name, cache, model_cfg, codec_cfg, state):
    data = ClientData(name=name, train=torch.zeros(64, dtype=torch.uint8), eval=torch.zeros(64, dtype=torch.uint8))
    w = WorkerProtocol(WorkerOptions("127.0.0.1:1", "t", tmp_path / name, log=lambda m: None), data, cache)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    w.model_cfg, w.shapes = model_cfg, shapes
    w.global_state, w.version, w.model_sha = state, 0, model_hash(state)
    w.shared = SharedState.initial(shapes, codec_cfg)
    return w


def test_clients_share_a_downlink_chain_applied_from_the_same_version_only(tmp_path):
    """Two clients at the same verified version get one application of the same chain;
    a client whose weights differ computes its own (and fails the hash check)."""
    model_cfg, codec_cfg = MLAConfig.preset("tiny"), CodecConfig()
    state0 = init_global_state(model_cfg, 0)
    server = ServerCodec(model_cfg, codec_cfg, state0)
    g = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(t.shape, generator=g) * 1e-2 for n, t in state0.items()}
    downlink = server.finish_round(server.plan(), delta, None)
    dl = DownloadedModel(
        kind=cpb.DownloadModelResponse.CODEC_CHAIN, base_version=0,
        model=pb.ModelVersion(version=1, sha256=server.global_hash()),
        data=cpb.CodecDownlinks(base_version=0, downlinks=[downlink.SerializeToString()]).SerializeToString())
    cache, cfg_json = ComputeCache(), codec_cfg.model_dump_json()
    a = _worker(tmp_path, "a", cache, model_cfg, codec_cfg, state0)
    b = _worker(tmp_path, "b", cache, model_cfg, codec_cfg, state0)
    state_a, shared_a = a._apply(dl, cfg_json)
    assert model_hash(state_a) == server.global_hash() and cache.misses == 1
    state_b, shared_b = b._apply(dl, cfg_json)
    assert state_b is state_a and shared_b is shared_a and cache.hits == 1
    tampered = {n: t + 1e-3 for n, t in state0.items()}
    c = _worker(tmp_path, "c", cache, model_cfg, codec_cfg, tampered)
    with pytest.raises(ModelIntegrityError, match="hash"):
        c._apply(dl, cfg_json)
    assert cache.misses == 2 and cache.hits == 1
