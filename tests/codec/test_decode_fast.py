"""The coordinator's numpy decode path against a straightforward torch reference (the
decoder as it was before issue 14): the same float32 bits for every well-formed tensor,
the same refusal, with the same message, for every malformed one."""

import itertools
import math

import pytest
import torch

from fedmla.mla_model import MLAConfig
from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec, UpdateDecodeError
from fedmla.protos.codec.quant import code_range, container_bits, level_values
from fedmla.protos.codec.wire import TensorCodec
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import (MAX_DIM_PRODUCT, MAX_DIMS, TensorDecodeError, _payload, decode_int_rows,
                                   decode_tensor, encode_int_rows, encode_tensor, pack_int2, pack_int4)
from fedmla.worker.trainer import init_global_state

MODEL = MLAConfig.preset("tiny")


# ---- the reference: torch ops, one tensor at a time, as the decoder was -----------------------
def ref_check_shape(shape, what, max_elements):
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"{what}: negative dimension in shape {list(shape)}")
    if len(shape) > MAX_DIMS:
        raise TensorDecodeError(f"{what}: {len(shape)} dimensions exceeds the limit of {MAX_DIMS}")
    if math.prod(d for d in shape if d) > MAX_DIM_PRODUCT:
        raise TensorDecodeError(f"{what}: shape {list(shape)} is too large to address")
    n = math.prod(shape) if shape else 1
    if max_elements is not None and n > max_elements:
        raise TensorDecodeError(f"{what}: {n} elements exceeds the limit of {max_elements}")
    return n


def ref_unpack_int4(packed, cols):
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    both = torch.stack([lo, hi], dim=-1).reshape(packed.size(0), -1)[:, :cols]
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def ref_unpack_int2(packed, cols):
    parts = [((packed >> shift) & 0x3) for shift in (0, 2, 4, 6)]
    codes = torch.stack(parts, dim=-1).reshape(packed.size(0), -1)[:, :cols]
    return (codes.to(torch.int16) - 2).to(torch.int8)


_SCHEMES = {pb.Quantization.INT8_ROW: (8, pb.INT8, lambda c: c), pb.Quantization.INT4_ROW: (4, pb.INT4, lambda c: (c + 1) // 2),
            pb.Quantization.INT2_ROW: (2, pb.INT2, lambda c: (c + 3) // 4)}


def ref_decode_int_rows(msg, what="tensor", max_elements=None):
    scheme = msg.quant.scheme if msg.HasField("quant") else pb.Quantization.SCHEME_NONE
    if scheme not in _SCHEMES:
        raise TensorDecodeError(f"{what}: expected a row-quantised tensor, got scheme {scheme}")
    shape = tuple(msg.shape)
    if len(shape) != 2:
        raise TensorDecodeError(f"{what}: row-quantised tensors are 2-D, got shape {list(shape)}")
    ref_check_shape(shape, what, max_elements)
    R, C = shape
    bits, want_dtype, row_bytes_of = _SCHEMES[scheme]
    if msg.dtype != want_dtype:
        raise TensorDecodeError(f"{what}: scheme {pb.Quantization.Scheme.Name(scheme)} needs dtype "
                                f"{pb.DType.Name(want_dtype)}, got {pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else f'unknown({msg.dtype})'}")
    row_bytes = row_bytes_of(C)
    data = _payload(msg, R * row_bytes, what)
    if len(data) != R * row_bytes:
        raise TensorDecodeError(f"{what}: {len(data)} data bytes for {bits}-bit shape {list(shape)} "
                                f"(expected {R * row_bytes})")
    scales = decode_tensor(msg.quant.scales, f"{what}.scales", max_elements=R,
                           allowed={pb.FLOAT32, pb.FLOAT16}).float()
    if scales.shape != (R,):
        raise TensorDecodeError(f"{what}: {tuple(scales.shape)} scales for {R} rows")
    if not torch.isfinite(scales).all():
        raise TensorDecodeError(f"{what}: non-finite quantisation scale")
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    if bits == 8:
        q = raw.view(torch.int8).reshape(R, C)
    elif bits == 4:
        q = ref_unpack_int4(raw.reshape(R, row_bytes), C)
    else:
        q = ref_unpack_int2(raw.reshape(R, row_bytes), C)
    return q, scales, bits


def ref_tensor(self, msg, what, shape, bits):
    try:
        if bits:
            q, scales, got_bits = ref_decode_int_rows(msg, what, max_elements=math.prod(shape))
            if got_bits != container_bits(bits):
                raise UpdateDecodeError(f"{what}: {got_bits}-bit payload, this run uses {bits}-bit")
            lo, hi = code_range(bits)
            if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
                span = f"+-{hi}" if lo == -hi else f"[{lo}, {hi}]"
                raise UpdateDecodeError(f"{what}: integer codes beyond {span}, the range of "
                                        f"{bits}-bit quantisation")
            t = level_values(q, bits) * scales.float()[:, None]
        else:
            t = decode_tensor(msg, what, max_elements=math.prod(shape), allowed={pb.FLOAT32}).float()
    except TensorDecodeError as e:
        raise UpdateDecodeError(str(e)) from None
    if t.numel() != math.prod(shape):
        raise UpdateDecodeError(f"{what}: shape {list(t.shape)}, expected {list(shape)}")
    t = t.reshape(shape)
    if not torch.isfinite(t).all():
        raise UpdateDecodeError(f"{what}: non-finite values")
    return t


# ---- comparison helpers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def codec():
    state = init_global_state(MODEL, 0)
    return TensorCodec(MODEL, CodecConfig(), {n: tuple(t.shape) for n, t in state.items()})


def outcome(fn):
    try:
        t = fn()
    except (UpdateDecodeError, TensorDecodeError) as e:
        return ("refused", type(e).__name__, str(e))
    assert t.dtype == torch.float32 and t.is_contiguous()
    return ("ok", tuple(t.shape), t.view(torch.int32).flatten().tolist())     # the bits, -0.0 and all


def same(codec, msg, shape, bits, what="w.left"):
    fast = outcome(lambda: codec._tensor(msg, what, shape, bits))
    ref = outcome(lambda: ref_tensor(codec, msg, what, shape, bits))
    assert fast == ref, (fast[:3], ref[:3])
    return fast


def message(q, scales, bits, half=False, compress=False):
    return encode_int_rows(q, scales, container_bits(bits), half_scales=half, compress=compress)


def random_codes(g, rows, cols, bits):
    lo, hi = code_range(bits)
    return torch.randint(lo, hi + 1, (rows, cols), generator=g, dtype=torch.int8)


EXTREME_SCALES = [0.0, -0.0, 1e-45, 1.4e-40, 1.2e-38, 1e-3, 1.0, -2.5, 65504.0, 1e30, 2.0 ** 120,
                  2.0 ** 120 * 1.0000001, 2.0 ** 121, 3e38, -3e38, 3.4028235e38]


# ---- well-formed tensors: the same bits ----------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_random_codes_decode_to_the_same_bits(codec, bits):
    g = torch.Generator().manual_seed(bits)
    for rows, cols in itertools.product([1, 2, 5], [1, 2, 3, 5, 7, 8, 13, 64, 65, 130]):
        q = random_codes(g, rows, cols, bits)
        for kind in ("plain", "half", "extreme", "tiny"):
            if kind == "plain":
                s = torch.rand(rows, generator=g) * 3 - 1
            elif kind == "half":
                s = (torch.rand(rows, generator=g) * 100).half().float()
            elif kind == "extreme":
                s = torch.tensor([EXTREME_SCALES[int(i)] for i in torch.randint(0, len(EXTREME_SCALES), (rows,),
                                                                                generator=g)])
            else:                                              # subnormal products
                s = torch.rand(rows, generator=g) * 1e-38
            half = kind == "half"
            for compress in (False, True):
                res = same(codec, message(q, s, bits, half, compress), (rows, cols), bits)
                if kind != "extreme":
                    assert res[0] == "ok"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_code_and_overflowing_products(codec, bits):
    lo, hi = code_range(bits)
    codes = torch.arange(lo, hi + 1, dtype=torch.int8)
    q = codes.repeat(len(EXTREME_SCALES), 1)
    s = torch.tensor(EXTREME_SCALES)
    assert same(codec, message(q, s, bits), tuple(q.shape), bits)[0] == "refused"   # 3e38 * 127 overflows
    for i, scale in enumerate(EXTREME_SCALES):                                     # one row at a time
        same(codec, message(q[i:i + 1], s[i:i + 1], bits), (1, q.size(1)), bits)
    # the largest scales that stay finite with every code, and just beyond
    top = float(max(abs(v) for v in level_values(codes, bits).tolist()))
    for scale in (3.4028235e38 / top, math.nextafter(3.4028235e38 / top, math.inf), 2.0 ** 120, 2.0 ** 121):
        same(codec, message(q[:1], torch.tensor([scale]), bits), (1, q.size(1)), bits)


def test_float32_tensors_decode_to_the_same_bits(codec):
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (3, 7), (1, 64), (4, 65)]:
        x = torch.randn(shape, generator=g)
        x.view(-1)[0] = -0.0
        x.view(-1)[-1] = 1e-45
        assert same(codec, encode_tensor(x), shape, 0)[0] == "ok"
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y.view(-1)[-1] = bad
            assert same(codec, encode_tensor(y), shape, 0)[0] == "refused"
        same(codec, encode_tensor(x.reshape(-1)), shape, 0)                   # same count, other shape
        same(codec, encode_tensor(x[:, :-1].contiguous()), shape, 0)          # fewer elements
        same(codec, encode_tensor(x.double()), shape, 0)                      # dtype not allowed
        same(codec, encode_tensor(x.half()), shape, 0)


def test_padding_codes_of_odd_rows_are_ignored_as_before(codec):
    # the pad nibble / crumbs of an odd row are not codes: any value there is accepted
    for bits, pack in ((4, pack_int4), (3, pack_int4), (2, pack_int2)):
        q = random_codes(torch.Generator().manual_seed(1), 3, 5, bits)
        msg = message(q, torch.ones(3), bits)
        data = bytearray(msg.data)
        per_row = len(data) // 3
        for r in range(3):
            data[r * per_row + per_row - 1] |= 0x80                               # the pad's top bit
        msg.data = bytes(data)
        msg.compression = pb.COMPRESSION_NONE
        assert same(codec, msg, (3, 5), bits)[0] == "ok"


def test_decode_int_rows_matches_the_reference():
    g = torch.Generator().manual_seed(3)
    for bits, cols, compress in itertools.product([2, 3, 4, 8], [1, 4, 5, 33], [False, True]):
        q = random_codes(g, 3, cols, bits)
        msg = message(q, torch.rand(3, generator=g), bits, compress=compress)
        got, want = decode_int_rows(msg, "t"), ref_decode_int_rows(msg, "t")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
        assert torch.equal(got[0], q)
        got[0][0, 0] = 0                                                      # fresh and writable
    # every packed byte unpacks as before
    every = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    for bits, per in ((4, 2), (2, 4)):
        msg = encode_int_rows(torch.zeros(4, 64 * per, dtype=torch.int8), torch.ones(4), bits)
        msg.data = every.numpy().tobytes()
        ref_unpack = ref_unpack_int4 if bits == 4 else ref_unpack_int2
        assert torch.equal(decode_int_rows(msg)[0], ref_unpack(every, 64 * per))


# ---- malformed tensors: the same refusal, the same message -------------------------------------
def mutations(msg):
    """(label, mutated copy) pairs covering every check of the decoder."""
    def edit(fn):
        m = pb.Tensor()
        m.CopyFrom(msg)
        fn(m)
        return m

    R, C = msg.shape
    yield "no quant", edit(lambda m: m.ClearField("quant"))
    yield "scheme none", edit(lambda m: setattr(m.quant, "scheme", pb.Quantization.SCHEME_NONE))
    yield "unknown scheme", edit(lambda m: setattr(m.quant, "scheme", 77))
    yield "1-D", edit(lambda m: m.shape.pop())
    yield "3-D", edit(lambda m: m.shape.append(1))
    yield "negative", edit(lambda m: m.shape.__setitem__(1, -C))
    yield "too many", edit(lambda m: m.shape.__setitem__(1, C + 1))
    yield "fewer cols", edit(lambda m: m.shape.__setitem__(1, C - 1))
    yield "transposed", edit(lambda m: (m.shape.__setitem__(0, C), m.shape.__setitem__(1, R)))
    yield "zero rows", edit(lambda m: m.shape.__setitem__(0, 0))
    yield "zero cols", edit(lambda m: m.shape.__setitem__(1, 0))
    yield "huge", edit(lambda m: (m.shape.__setitem__(0, 0), m.shape.__setitem__(1, 1 << 50)))
    yield "wrong dtype", edit(lambda m: setattr(m, "dtype", pb.INT8 if m.dtype != pb.INT8 else pb.INT4))
    yield "unknown dtype", edit(lambda m: setattr(m, "dtype", 99))
    yield "short data", edit(lambda m: setattr(m, "data", m.data[:-1]))
    yield "long data", edit(lambda m: setattr(m, "data", m.data + b"\0"))
    yield "deflate garbage", edit(lambda m: (setattr(m, "compression", pb.DEFLATE), setattr(m, "data", b"\xff" * 9)))
    yield "unknown compression", edit(lambda m: setattr(m, "compression", 5))
    yield "scales fp64", edit(lambda m: m.quant.scales.CopyFrom(encode_tensor(torch.ones(R, dtype=torch.float64))))
    yield "scales int8", edit(lambda m: m.quant.scales.CopyFrom(encode_tensor(torch.ones(R, dtype=torch.int8))))
    yield "scales count", edit(lambda m: m.quant.scales.CopyFrom(encode_tensor(torch.ones(R + 1))))
    yield "scales fewer", edit(lambda m: m.quant.scales.CopyFrom(encode_tensor(torch.ones(max(R - 1, 0)))))
    yield "scales 2-D", edit(lambda m: m.quant.scales.CopyFrom(encode_tensor(torch.ones(R, 1))))
    yield "scales short", edit(lambda m: setattr(m.quant.scales, "data", m.quant.scales.data[:-1]))
    yield "scales quantised", edit(lambda m: setattr(m.quant.scales.quant, "scheme", pb.Quantization.INT8_ROW))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dt in (torch.float32, torch.float16):
            s = torch.ones(R, dtype=dt)
            s[-1] = bad
            yield f"scale {bad} {dt}", edit(lambda m, s=s: m.quant.scales.CopyFrom(encode_tensor(s)))
    yield "huge scale", edit(lambda m: m.quant.scales.CopyFrom(encode_tensor(torch.full((R,), 3e38))))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_malformed_tensors_are_refused_with_the_same_message(codec, bits):
    g = torch.Generator().manual_seed(10 + bits)
    refusals = set()
    for cols in (5, 8):
        q = random_codes(g, 3, cols, bits)
        for compress, half in ((False, False), (True, True)):
            msg = message(q, torch.rand(3, generator=g) + 0.1, bits, half, compress)
            for label, bad in mutations(msg):
                res = same(codec, bad, (3, cols), bits)
                if res[0] == "refused":
                    refusals.add(label)
            for other in (2, 3, 4, 8):                     # a payload of another width
                same(codec, message(random_codes(g, 3, cols, other), torch.ones(3), other), (3, cols), bits)
    assert {"no quant", "3-D", "negative", "too many", "fewer cols", "short data", "scales count",
            "deflate garbage", "huge scale"} <= refusals


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_codes_beyond_the_range_are_refused_with_the_same_message(codec, bits):
    cb = container_bits(bits)
    lo_c, hi_c = -(1 << (cb - 1)), (1 << (cb - 1)) - 1
    lo, hi = code_range(bits)
    for bad in sorted(set(range(lo_c, lo)) | set(range(hi + 1, hi_c + 1))):
        for where in ((0, 0), (2, 6), (1, 3)):
            q = random_codes(torch.Generator().manual_seed(bad & 0xFF), 3, 7, bits)
            q[where] = bad
            assert same(codec, message(q, torch.ones(3), bits), (3, 7), bits)[0] == "refused"
    # beyond the range and the wrong shape: the codes are named first, as before
    q = random_codes(torch.Generator().manual_seed(0), 3, 7, bits)
    q[0, 0] = lo_c
    assert "integer codes beyond" in same(codec, message(q, torch.ones(3), bits), (3, 8), bits)[2]


# ---- whole updates: the same parts, bit for bit ----------------------------------------------------
CONFIGS = {
    "default": CodecConfig(),
    "8-bit fp32 scales": CodecConfig(factor_bits=8, half_scales=False, entropy_coding=False),
    "2-bit": CodecConfig(factor_bits=2, dense_bits=2, keep_ratio=0.25),
    "4-bit fp32 dense": CodecConfig(factor_bits=4, dense_bits=0),
    "fedavg": CodecConfig.fedavg(),
    "topk": CodecConfig(method="topk", topk_chunk=256, topk_k=8),
    "powersgd": CodecConfig(method="powersgd", powersgd_warmup_rounds=0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_whole_updates_decode_and_aggregate_as_the_reference(name, monkeypatch):
    cfg = CONFIGS[name]
    state = init_global_state(MODEL, 0)
    server = ServerCodec(MODEL, cfg, state)
    server.importance = torch.rand(MODEL.n_layers, MODEL.n_heads, generator=torch.Generator().manual_seed(2)).double()
    plan = server.plan()
    g = torch.Generator().manual_seed(5)
    msgs = []
    for i in range(3):
        local = {n: t + torch.randn(t.shape, generator=g) * 10.0 ** -(1 + i) for n, t in state.items()}
        msgs.append(ClientCodec(MODEL, cfg, server.shapes, f"c{i}").encode(state, local, plan, None, 3 + 7 * i))

    def run():
        agg = server.aggregator(plan)
        parts = []
        for i, m in enumerate(msgs):
            u = server.decode(m, plan)
            parts.append({n: [t for t in (p.left, p.right, p.value) if t is not None] for n, p in u.tensors.parts.items()})
            agg.add(f"c{i}", u)
        return parts, agg.finish(), {n: agg._sum.value(n) for n in server.shapes}

    fast = run()
    monkeypatch.setattr(TensorCodec, "_tensor", ref_tensor)
    ref = run()
    for got, want in zip(fast[0], ref[0]):
        assert got.keys() == want.keys()
        for n in got:
            assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(got[n], want[n])), n
    for n in server.shapes:
        assert torch.equal(fast[1][n].view(torch.int32), ref[1][n].view(torch.int32)), n
        assert torch.equal(fast[2][n].view(torch.int64), ref[2][n].view(torch.int64)), n


def test_importance_decodes_as_before():
    from fedmla.protos.codec.server import decode_importance

    def ref(msg, L, H):
        t = torch.tensor(list(msg.scores), dtype=torch.float32).view(L, H)
        if not torch.isfinite(t).all() or (t < 0).any():
            raise UpdateDecodeError("importance scores must be finite and >= 0")
        return t

    g = torch.Generator().manual_seed(0)
    vals = (torch.rand(2 * 3, generator=g).double() * 10 ** torch.randint(-40, 40, (6,), generator=g)).tolist()
    for scores in (vals, [0.0, -0.0, 1e-46, 3.4028235e38, 3.4028236e38, 1 / 3],
                   [1.0, 2.0, 3.0, 4.0, 5.0, 1e39], [1.0] * 5 + [float("nan")], [1.0] * 5 + [-1e-50], [-1.0] + [1.0] * 5):
        msg = pb.HeadScores(num_layers=2, num_heads=3, scores=scores)
        assert outcome(lambda: decode_importance(msg, 2, 3)) == outcome(lambda: ref(msg, 2, 3)), scores
