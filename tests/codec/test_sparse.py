"""Chunked top-k (``method='topk'``): exactness of kept entries, refusal of hostile
positions and counts, exact aggregation, and rounds end to end."""

import zlib

import numpy as np
import pytest
import torch

from fedmla.mla_model import MLAConfig
from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec, UpdateDecodeError, apply_downlink
from fedmla.protos.codec import sparse
from fedmla.protos.codec.wire import TensorCodec
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import encode_tensor
from fedmla.protos.weights import model_hash
from fedmla.worker.trainer import init_global_state

MODEL = MLAConfig.preset("tiny")


@pytest.fixture(scope="module")
def global_state():
    return init_global_state(MODEL, 0)


def perturbed(state, seed, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in state.items()}


def fp32(v):
    return encode_tensor(v.float().contiguous()), v.float()


def test_layout_and_selection_hand_computed():
    # 20 elements, chunk 8: two chunks, of 8 and 12 elements (the last takes the remainder)
    assert sparse.layout(20, 8, 2) == (2, 2)
    assert sparse.layout(5, 8, 7) == (1, 5)          # shorter than a chunk: one chunk, k capped at N
    x = torch.zeros(20)
    x[[1, 6, 3]] = torch.tensor([5.0, -7.0, 1.0])     # chunk 0: keeps 6 and 1 (|-7|, |5|), not 3
    x[[8, 19, 12]] = torch.tensor([0.5, -9.0, 2.0])   # chunk 1 (8..19): keeps 19 and 12
    assert sparse.select(x, 8, 2).tolist() == [[1, 6], [4, 11]]
    msg, got = sparse.encode(x, 8, 2, fp32)
    want = torch.zeros(20)
    want[[1, 6, 12, 19]] = x[[1, 6, 12, 19]]
    assert torch.equal(got, want)
    # gaps: chunk 0 positions 1, 6 -> 1, 4; chunk 1 positions 4, 11 -> 4, 6 (uint16, planar)
    raw = zlib.decompressobj(-15).decompress(msg.positions) if msg.positions_compression == pb.DEFLATE \
        else msg.positions
    assert list(raw) == [1, 4, 4, 6, 0, 0, 0, 0]
    back = sparse.decode(pb.SparseChunks.FromString(msg.SerializeToString()), "w", (4, 5), 8, 2,
                         lambda m, what, shape: torch.frombuffer(bytearray(m.data), dtype=torch.float32).view(shape))
    assert torch.equal(back, want.view(4, 5))


@pytest.mark.parametrize("bits", [0, 2, 8])
def test_kept_entries_round_trip_through_the_codec(global_state, bits):
    cfg = CodecConfig(method="topk", topk_chunk=512, topk_k=16, topk_bits=bits, head_selection=False)
    shapes = {n: tuple(t.shape) for n, t in global_state.items()}
    codec = TensorCodec(MODEL, cfg, shapes)
    server = ServerCodec(MODEL, cfg, global_state)
    plan = server.plan()
    x = {n: torch.randn(s, generator=torch.Generator().manual_seed(3)) for n, s in shapes.items()}
    _, dense, sent = codec.encode(x, plan, uplink=True, gen=torch.Generator().manual_seed(0))
    sparse_msgs = [d for d in dense if d.HasField("sparse")]
    assert sparse_msgs and all(not d.HasField("value") for d in sparse_msgs)
    wire = [pb.DenseUpdate.FromString(d.SerializeToString()) for d in dense]
    decoded = codec.decode([], wire, plan, uplink=True)
    for d in sparse_msgs:
        name = d.name
        got = decoded.parts[name].dense(shapes[name])
        assert torch.equal(got, sent[name]), name            # the sender's reconstruction is the receiver's
        flat, ref = got.reshape(-1), x[name].reshape(-1)
        c, k = sparse.layout(flat.numel(), 512, 16)
        kept = torch.zeros_like(flat, dtype=torch.bool)
        kept[sparse.select(ref, 512, 16).add(torch.arange(c).view(c, 1) * 512).view(-1)] = True
        assert int(kept.sum()) == c * k
        assert torch.count_nonzero(flat[~kept]) == 0       # nothing outside the top-k
        if bits == 0:
            assert torch.equal(flat[kept], ref[kept])      # kept entries exact in fp32
        else:
            assert torch.equal(torch.sign(flat[kept]), torch.sign(ref[kept]))
            # per chunk: error at most half a level step of that chunk's scale
            scale = ref[kept].view(c, k).abs().amax(dim=1) / (2 if bits == 2 else 127)
            err = (flat[kept] - ref[kept]).view(c, k).abs()
            assert (err <= scale[:, None] / 2 * (1 + 1e-3) + 1e-6).all(), name


def _good(global_state, cfg=None):
    cfg = cfg or CodecConfig(method="topk", topk_chunk=256, topk_k=8)
    server = ServerCodec(MODEL, cfg, global_state)
    plan = server.plan()
    msg = ClientCodec(MODEL, cfg, server.shapes, "a").encode(global_state, perturbed(global_state, 1), plan, None, 8)
    return server, plan, msg


def _positions(c, k, gaps_rows):
    arr = np.asarray(gaps_rows, dtype="<u2").reshape(-1)
    return np.ascontiguousarray(arr.view(np.uint8).reshape(-1, 2).T).tobytes()


def test_hostile_positions_and_counts_are_refused(global_state):
    server, plan, good = _good(global_state)
    server.decode(good, plan)
    i = next(j for j, d in enumerate(good.dense) if d.HasField("sparse"))
    name = good.dense[i].name
    sp = good.dense[i].sparse
    c = len(sp.values.quant.scales.data) // (2 if sp.values.quant.scales.dtype == pb.FLOAT16 else 4)
    k = sp.k

    def broken(fn):
        m = pb.ModelUpdate()
        m.CopyFrom(good)
        fn(m.dense[i])
        return m

    def set_positions(d, data, comp=pb.COMPRESSION_NONE):
        d.sparse.positions = data
        d.sparse.positions_compression = comp

    too_far = [[0] * (k - 1) + [60000]] * c                           # last position far beyond its chunk
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = bomb.compress(b"\0" * (1 << 22)) + bomb.flush()             # inflates to 4 MiB, far over 2*C*k
    cases = [
        (lambda d: setattr(d.sparse, "k", k * 1000), f"{name}: chunk 256, k {k * 1000}; this tensor is sent with"),
        (lambda d: setattr(d.sparse, "k", -1), f"{name}: chunk 256, k -1"),
        (lambda d: setattr(d.sparse, "chunk", 1 << 30), f"{name}: chunk {1 << 30}"),
        (lambda d: set_positions(d, _positions(c, k, too_far)), f"{name}: position \\d+ beyond chunk 0"),
        (lambda d: set_positions(d, _positions(c, k, too_far)[:-1]), f"{name}: {2 * c * k - 1} position bytes"),
        (lambda d: set_positions(d, bomb, pb.DEFLATE), f"{name}: positions do not inflate to the expected"),
        (lambda d: set_positions(d, b"\xff\xff\xff", pb.DEFLATE), f"{name}: corrupt DEFLATE positions"),
        (lambda d: set_positions(d, b"", 7), f"{name}: unknown positions compression"),
        (lambda d: d.sparse.values.shape.__setitem__(1, k + 1), f"{name}.values"),
        (lambda d: d.sparse.ClearField("values"), f"{name}: no values"),
        (lambda d: d.value.CopyFrom(d.sparse.values), f"{name}: both a dense value and sparse entries"),
    ]
    for fn, msg in cases:
        with pytest.raises(UpdateDecodeError, match=msg):
            server.decode(pb.ModelUpdate.FromString(broken(fn).SerializeToString()), plan)
    # a sparse update for a tensor the codec sends low-rank (an svd run) or dense (1-D) is refused
    svd = ServerCodec(MODEL, CodecConfig(method="svd"), global_state)
    with pytest.raises(UpdateDecodeError, match=f"{name}: top-k sparse update for a tensor this codec sends low-rank"):
        svd.decode(good, svd.plan())
    m = pb.ModelUpdate()
    m.CopyFrom(good)
    j = next(j for j, d in enumerate(m.dense) if not d.HasField("sparse"))
    m.dense[j].sparse.CopyFrom(sp)
    m.dense[j].ClearField("value")
    with pytest.raises(UpdateDecodeError, match=f"{m.dense[j].name}: top-k sparse update for a tensor this codec "
                                                f"sends dense"):
        server.decode(m, plan)


@pytest.mark.parametrize("downlink", ["svd", "topk"])
def test_rounds_end_to_end_hashes_match(global_state, downlink):
    from fedmla.worker.data import ClientData
    from fedmla.worker.trainer import LocalTrainer, TrainerConfig

    cfg = CodecConfig(method="topk", topk_chunk=512, topk_k=16, topk_downlink=downlink, downlink_topk_k=32,
                      keep_ratio=0.5)
    trainer = LocalTrainer(MODEL, TrainerConfig(local_steps=2, batch_size=2, seq_len=16, warmup_steps=0,
                                                total_steps=10))
    g = torch.Generator().manual_seed(0)
    data = [ClientData(f"c{i}", torch.randint(0, 256, (400,), generator=g, dtype=torch.uint8),
                       torch.empty(0, dtype=torch.uint8)) for i in range(2)]
    server = ServerCodec(MODEL, cfg, global_state)
    clients = [ClientCodec(MODEL, cfg, server.shapes, c.name) for c in data]
    w_state, w_shared, w_codec = dict(global_state), server.shared, TensorCodec(MODEL, cfg, server.shapes)
    for r in range(3):
        plan = server.plan()
        agg = server.aggregator(plan)
        for c, codec in zip(data, clients):
            res = trainer.train(w_state, c, round_idx=r)
            msg = codec.encode(w_state, res.state, plan, res.importance, res.num_examples)
            assert any(d.HasField("sparse") for d in msg.dense) and not msg.factors
            assert len(msg.SerializeToString()) <= server.max_update_bytes(plan)
            agg.add(c.name, server.decode(pb.ModelUpdate.FromString(msg.SerializeToString()), plan))
        down = server.finish_round(plan, agg.finish(), agg.importance())
        assert bool(down.factors) == (downlink == "svd")
        assert any(d.HasField("sparse") for d in down.dense) == (downlink == "topk")
        w_state, w_shared = apply_downlink(w_state, w_shared, pb.ModelUpdate.FromString(down.SerializeToString()),
                                           w_codec)
        assert model_hash(w_state) == server.global_hash()
    assert model_hash(w_state) != model_hash(global_state)


def test_config_bounds():
    with pytest.raises(ValueError, match="must not exceed topk_chunk"):
        CodecConfig(method="topk", topk_chunk=64, topk_k=65)
    with pytest.raises(ValueError):
        CodecConfig(method="topk", topk_chunk=1 << 15)
