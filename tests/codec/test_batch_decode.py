"""The compiled one-pass decode (protos/codec/batch_decode.py) against the per-tensor
decoder: the same parts and float32 bits for well-formed updates of several bit widths;
for malformed ones it steps aside and the coordinator refuses with the per-tensor
decoder's own error."""

import pytest
import torch

from fedmla.mla_model import MLAConfig
from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec, UpdateDecodeError
from fedmla.protos.codec import batch_decode
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import _payload
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
