"""The compiled one-pass decode (protos/codec/batch_decode.py) against the per-tensor
decoder: the same parts and float32 bits for well-formed updates of several bit widths;
for malformed ones it steps aside and the coordinator refuses with the per-tensor
decoder's own error."""

import zlib

import numpy as np
import pytest
import torch

from fedmla.mla_model import MLAConfig
from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec, UpdateDecodeError
from fedmla.protos.codec import batch_decode
from fedmla.protos.codec.layout import RoundPlan, SharedState
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import _payload, deflate
from fedmla.worker.trainer import init_global_state

MODEL = MLAConfig.preset("tiny")

CONFIGS = [
    CodecConfig(),                                              # 3-bit factors, 8-bit dense, float16 scales
    CodecConfig(factor_bits=2, dense_bits=4, half_scales=False),
    CodecConfig(factor_bits=8, dense_bits=2, entropy_coding=False, keep_ratio=1.0),
    CodecConfig(factor_bits=4, embed_factor_bits=8, rank=5),
    CodecConfig(ffn_rank=7, embed_rank=9, early_rounds=1, early_rank=6),   # ranks by tensor and round
]


def _setup(cfg: CodecConfig, seed: int = 0, scale: float = 1e-2):
    state = init_global_state(MODEL, 0)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    server = ServerCodec(MODEL, cfg, state)
    plan = server.plan()
    g = torch.Generator().manual_seed(seed)
    local = {n: t + torch.randn(t.shape, generator=g) * scale for n, t in state.items()}
    msg = ClientCodec(MODEL, cfg, shapes, "c").encode(state, local, plan, torch.rand(MODEL.n_layers, MODEL.n_heads,
                                                                                     generator=g), 7, {"loss": 1.0})
    return server, plan, pb.ModelUpdate.FromString(msg.SerializeToString())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _assert_same(a, b):
    assert list(a.parts) == list(b.parts)
    for name in a.parts:
        pa, pb_ = a.parts[name], b.parts[name]
        assert pa.side == pb_.side and pa.sel is pb_.sel and pa.basis is pb_.basis, name
        for field in ("left", "right", "value"):
            x, y = getattr(pa, field), getattr(pb_, field)
            assert (x is None) == (y is None), (name, field)
            if x is not None:
                assert x.shape == y.shape and x.dtype == y.dtype == torch.float32, (name, field)
                assert torch.equal(_bits(x), _bits(y)), (name, field)
                assert x.data_ptr() % 64 == 0          # aligned as a fresh torch tensor
        assert torch.equal(_bits(pa.product()), _bits(pb_.product())), name


@pytest.fixture
def compiled():
    if batch_decode._kernel() is None:
        pytest.skip("numba not installed or FEDMLA_EXACT_KERNELS=numpy")


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "2bit", "8bit-all-heads", "4bit-embed8", "scheduled-ranks"])
@pytest.mark.parametrize("scale", [1e-2, 3.0])
def test_same_parts_and_bits_as_the_per_tensor_decoder(compiled, cfg, scale):
    server, plan, msg = _setup(cfg, seed=1, scale=scale)
    fast = batch_decode.decode_tensors(server.tensors, msg.factors, msg.dense, plan)
    assert fast is not None and len(fast.parts) == len(server.tensors.expected(plan, uplink=True))
    _assert_same(fast, server.tensors.decode(msg.factors, msg.dense, plan, uplink=True))
    assert any(p.value is not None for p in fast.parts.values())
    assert any(p.left is not None for p in fast.parts.values())


def _raw_codes(t: pb.Tensor, rows: int, row_bytes: int) -> bytearray:
    """The packed codes of a row-quantised message, stored uncompressed from now on."""
    data = bytearray(_payload(t, rows * row_bytes, "t"))
    t.compression = pb.COMPRESSION_NONE
    return data


def _refusal(fn):
    with pytest.raises(UpdateDecodeError) as e:
        fn()
    return str(e.value)


def _code_out_of_range(msg):
    t = msg.factors[3].left                       # 3-bit codes in 4-bit slots: 7 is beyond +-3
    rows, cols = t.shape
    data = _raw_codes(t, rows, (cols + 1) // 2)
    data[-1] = (data[-1] & 0xF0) | 0x7
    t.data = bytes(data)


def _scale_not_finite(msg):
    sc = msg.dense[0].value.quant.scales
    inf = b"\x00\x7c" if sc.dtype == pb.FLOAT16 else b"\x00\x00\x80\x7f"      # +inf, little-endian
    sc.data = inf + sc.data[len(inf):]


def _transposed(msg):
    t = msg.factors[0].left
    t.shape[:] = list(reversed(t.shape))


def _short_codes(msg):
    t = msg.factors[1].right
    rows, cols = t.shape
    t.data = bytes(_raw_codes(t, rows, (cols + 1) // 2)[:-1])


def _sent_twice(msg):
    msg.factors.append(msg.factors[0])


@pytest.mark.parametrize("corrupt", [_code_out_of_range, _scale_not_finite, _transposed, _short_codes, _sent_twice])
def test_malformed_updates_are_refused_with_the_per_tensor_decoders_error(compiled, corrupt):
    server, plan, msg = _setup(CodecConfig(), seed=2)
    corrupt(msg)
    assert batch_decode.decode_tensors(server.tensors, msg.factors, msg.dense, plan) is None
    old = _refusal(lambda: server.tensors.decode(msg.factors, msg.dense, plan, uplink=True))
    assert old and _refusal(lambda: server.decode(msg, plan)) == old


def test_without_numba_the_coordinator_decodes_per_tensor(monkeypatch):
    server, plan, msg = _setup(CodecConfig(), seed=3)
    monkeypatch.setattr(batch_decode, "_kernel", lambda: None)
    assert batch_decode.decode_tensors(server.tensors, msg.factors, msg.dense, plan) is None
    assert not batch_decode.warm_up()
    got = server.decode(msg, plan).tensors
    _assert_same(got, server.tensors.decode(msg.factors, msg.dense, plan, uplink=True))


# ---- the plan's table: built once per plan, never carried over to another plan -------------

def _encode(server, cfg, plan, seed):
    """A client's serialized-and-parsed update for ``plan``."""
    state = server.global_state
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    g = torch.Generator().manual_seed(seed)
    local = {n: t + torch.randn(t.shape, generator=g) * 1e-2 for n, t in state.items()}
    msg = ClientCodec(MODEL, cfg, shapes, f"c{seed}").encode(state, local, plan, None, 5)
    return pb.ModelUpdate.FromString(msg.SerializeToString())


def _some_heads(seed: int) -> torch.Tensor:
    """An (L, H) mask with about half the heads of each layer active, at least one."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(MODEL.n_layers, MODEL.n_heads, generator=g) < 0.5
    mask[:, seed % MODEL.n_heads] = True
    return mask


def _same_as_per_tensor(server, plan, msg):
    fast = batch_decode.decode_tensors(server.tensors, msg.factors, msg.dense, plan)
    assert fast is not None
    _assert_same(fast, server.tensors.decode(msg.factors, msg.dense, plan, uplink=True))
    assert batch_decode.plan_table(server.tensors, plan).expected == server.tensors.expected(plan, uplink=True)
    return fast


@pytest.mark.parametrize("cfg", [CodecConfig(rank=5, early_rounds=1, early_rank=6, dense_every=2),
                                 CodecConfig(method="powersgd", rank=5, dense_every=2)], ids=["svd", "powersgd"])
def test_plans_of_other_masks_rounds_and_ranks_get_their_own_table(compiled, cfg):
    """Round 0 (svd; rank 6 in the early round; all heads), round 1 with a head subset
    (rank 5; powersgd: shared right bases; no dense tensors), round 1 with another subset:
    each update decodes exactly as the per-tensor decoder does, also when the plans
    alternate (a table kept from another plan would give the wrong shapes, ranks or bases)."""
    server, plan0, _ = _setup(cfg)
    one = SharedState(round=1, bases=server.shared.bases)
    plans = [plan0, RoundPlan(round=1, mask=_some_heads(1), shared=one, send_dense=False),
             RoundPlan(round=1, mask=_some_heads(2), shared=one, send_dense=False)]
    msgs = [_encode(server, cfg, p, seed) for seed, p in enumerate(plans)]
    sides, ranks = set(), set()
    for p, m in [*zip(plans, msgs), *zip(plans, msgs)]:
        fast = _same_as_per_tensor(server, p, m)
        sides |= {part.side for part in fast.parts.values()}
        ranks |= {f.rank for f in m.factors}
    assert sides == ({None, "right"} if cfg.method == "powersgd" else {None})
    assert {5, 6} <= ranks if cfg.method == "svd" else 5 in ranks
    assert len(msgs[0].dense) and not msgs[1].dense
    # an update for one plan is not taken under another (shapes, ranks, heads differ)
    for i, j in [(0, 1), (1, 2), (2, 0)]:
        assert batch_decode.decode_tensors(server.tensors, msgs[i].factors, msgs[i].dense, plans[j]) is None


def test_a_mask_changed_in_place_gets_a_new_table(compiled):
    cfg = CodecConfig()
    server, _, _ = _setup(cfg)
    plan = RoundPlan(round=1, mask=_some_heads(3), shared=SharedState(round=1, bases=server.shared.bases))
    _same_as_per_tensor(server, plan, _encode(server, cfg, plan, 1))
    before = batch_decode.plan_table(server.tensors, plan)
    plan.mask.copy_(_some_heads(4))
    _same_as_per_tensor(server, plan, _encode(server, cfg, plan, 2))
    assert batch_decode.plan_table(server.tensors, plan) is not before


def test_another_order_and_mixed_scale_dtypes_decode_the_same(compiled):
    """Entries in another order than the encoder's, float32 scales among float16 ones,
    one tensor left uncompressed: the same parts and bits as the per-tensor decoder."""
    server, plan, msg = _setup(CodecConfig(), seed=4)
    factors = list(msg.factors)[::-1]
    del msg.factors[:]
    msg.factors.extend(factors)
    for t in (msg.factors[1].left, msg.dense[2].value, msg.dense[5].value):
        sc = t.quant.scales
        assert sc.dtype == pb.FLOAT16
        sc.data = np.frombuffer(sc.data, "<f2").astype("<f4").tobytes()   # exact: float16 -> float32
        sc.dtype = pb.FLOAT32
    t = msg.factors[4].right
    assert t.compression == pb.DEFLATE
    t.data = _payload(t, len(zlib.decompress(t.data, -15)), "t")
    t.compression = pb.COMPRESSION_NONE
    fast = _same_as_per_tensor(server, plan, msg)
    assert list(fast.parts)[0] == msg.factors[0].name


def test_a_partial_update_is_refused_as_before(compiled):
    server, plan, msg = _setup(CodecConfig(), seed=5)
    del msg.dense[3]
    _same_as_per_tensor(server, plan, msg)
    assert "update lacks 1 of the plan's" in _refusal(lambda: server.decode(msg, plan))


# ---- hostile updates: the fast path steps aside, the per-tensor decoder's message ------------

def _wrong_rank(msg):
    msg.factors[2].rank += 1


def _heads_where_all_are_active(msg):
    msg.factors[0].heads.heads[:] = [0]


def _sparse_and_value(msg):
    msg.dense[1].sparse.chunk = 4


def _no_value(msg):
    msg.dense[1].ClearField("value")


def _unknown_name(msg):
    msg.factors[5].name = "layers.99.nothing"


def _dense_name_as_factor(msg):
    msg.factors[5].name = msg.dense[0].name


def _inflates_too_far(msg):
    t = msg.factors[6].left
    rows, cols = t.shape
    t.data = deflate(bytes(rows * ((cols + 1) // 2) + 1))


def _trailing_bytes_after_deflate(msg):
    msg.factors[6].right.data += b"\x00"


def _corrupt_deflate(msg):
    msg.factors[7].left.data = b"\xff" * 40


def _unknown_compression(msg):
    msg.factors[7].right.compression = 7


def _short_scales(msg):
    sc = msg.dense[4].value.quant.scales
    sc.data = sc.data[:-2]


def _quantised_scales(msg):
    msg.dense[4].value.quant.scales.quant.scheme = pb.Quantization.INT8_ROW


def _other_bit_width(msg):
    msg.factors[8].left.quant.scheme = pb.Quantization.INT8_ROW


HOSTILE = [_wrong_rank, _heads_where_all_are_active, _sparse_and_value, _no_value, _unknown_name,
           _dense_name_as_factor, _inflates_too_far, _trailing_bytes_after_deflate, _corrupt_deflate,
           _unknown_compression, _short_scales, _quantised_scales, _other_bit_width]


@pytest.mark.parametrize("corrupt", HOSTILE)
def test_hostile_updates_are_refused_with_the_per_tensor_decoders_error(compiled, corrupt):
    server, plan, msg = _setup(CodecConfig(), seed=6)
    batch_decode.decode_tensors(server.tensors, msg.factors, msg.dense, plan)      # the table is built
    corrupt(msg)
    assert batch_decode.decode_tensors(server.tensors, msg.factors, msg.dense, plan) is None
    old = _refusal(lambda: server.tensors.decode(msg.factors, msg.dense, plan, uplink=True))
    assert old and _refusal(lambda: server.decode(msg, plan)) == old


def test_a_layer_with_no_active_head_is_refused_as_before(compiled):
    """A per-head tensor of a layer with no active head has an empty selection, which the
    per-tensor decoder refuses whatever is sent (no heads list can match it): a rank-0
    entry that fits its (0, m') / (0, n') shapes exactly must not pass the fast path."""
    cfg = CodecConfig()
    server, _, _ = _setup(cfg)
    one = SharedState(round=1, bases=server.shared.bases)
    sent = RoundPlan(round=1, mask=_some_heads(5), shared=one)
    msg = _encode(server, cfg, sent, 3)
    mask = sent.mask.clone()
    mask[0] = False
    plan = RoundPlan(round=1, mask=mask, shared=one)
    emptied = 0
    for f in msg.factors:
        sel = server.tensors._selection(f.name, mask)
        if sel.heads != []:
            continue
        m, n = sel.sub_shape(server.tensors.shapes[f.name])
        f.rank = 0
        f.ClearField("heads")
        for t, cols in ((f.left, m), (f.right, n)):
            t.shape[:] = [0, cols]
            t.data = b""
            t.compression = pb.COMPRESSION_NONE
            t.quant.scales.shape[:] = [0]
            t.quant.scales.data = b""
        emptied += 1
    assert emptied
    assert batch_decode.decode_tensors(server.tensors, msg.factors, msg.dense, plan) is None
    assert "the round's active heads are []" in _refusal(lambda: server.tensors.decode(msg.factors, msg.dense, plan,
                                                                                       uplink=True))
