"""2-bit packing and DEFLATE-coded payloads of protos.tensors."""

import zlib

import pytest
import torch

from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import (MAX_INFLATED_BYTES, TensorDecodeError, decode_int_rows, decode_tensor, deflate,
                            encode_int_rows, encode_tensor, pack_int2, unpack_int2)


def test_pack_int2_hand_computed():
    q = torch.tensor([[-2, -1, 0, 1, 1]], dtype=torch.int8)       # codes 0, 1, 2, 3 | 3 (+ 3 zero pad codes)
    packed = pack_int2(q)
    assert packed.tolist() == [[0b11_10_01_00, 0b00_00_00_11]]
    assert torch.equal(unpack_int2(packed, 5), q)


@pytest.mark.parametrize("cols", [0, 1, 3, 4, 7, 64])
def test_int2_rows_roundtrip(cols):
    g = torch.Generator().manual_seed(cols)
    q = torch.randint(-2, 2, (5, cols), generator=g, dtype=torch.int8)
    msg = pb.Tensor.FromString(encode_int_rows(q, torch.rand(5), 2).SerializeToString())
    assert msg.dtype == pb.INT2 and msg.quant.scheme == pb.Quantization.INT2_ROW
    assert len(msg.data) == 5 * ((cols + 3) // 4)
    q2, _, bits = decode_int_rows(msg)
    assert bits == 2 and torch.equal(q2, q)


def test_deflate_is_used_only_when_smaller_and_decodes_to_the_same_codes():
    g = torch.Generator().manual_seed(0)
    peaked = torch.randint(-1, 2, (12, 300), generator=g, dtype=torch.int8)      # 3 of 15 codes: compresses
    msg = encode_int_rows(peaked, torch.rand(12), 4, compress=True)
    assert msg.compression == pb.DEFLATE and len(msg.data) < 12 * 150
    assert torch.equal(decode_int_rows(pb.Tensor.FromString(msg.SerializeToString()))[0], peaked)
    tiny = torch.tensor([[3]], dtype=torch.int8)                                   # 1 byte: DEFLATE only adds
    assert encode_int_rows(tiny, torch.ones(1), 4, compress=True).compression == pb.COMPRESSION_NONE


def _compressed(t: torch.Tensor, payload: bytes) -> pb.Tensor:
    msg = encode_tensor(t)
    msg.data = payload
    msg.compression = pb.DEFLATE
    return msg


def test_compressed_plain_tensor_roundtrip_and_bad_streams_refused():
    t = torch.arange(24, dtype=torch.float32).reshape(2, 12)
    raw = t.numpy().tobytes()
    assert torch.equal(decode_tensor(_compressed(t, deflate(raw))), t)
    with pytest.raises(TensorDecodeError, match="corrupt DEFLATE"):
        decode_tensor(_compressed(t, b"\xff\xfe garbage"))
    with pytest.raises(TensorDecodeError, match="expected 96 bytes"):
        decode_tensor(_compressed(t, deflate(raw[:-4])))                           # inflates short
    with pytest.raises(TensorDecodeError, match="expected 96 bytes"):
        decode_tensor(_compressed(t, deflate(raw + b"\x00" * 8)))                 # inflates long
    with pytest.raises(TensorDecodeError, match="expected 96 bytes"):
        decode_tensor(_compressed(t, deflate(raw) + b"trailing"))
    zlib_framed = zlib.compress(raw)                                              # header: not a raw stream
    with pytest.raises(TensorDecodeError):
        decode_tensor(_compressed(t, zlib_framed))
    bad = _compressed(t, deflate(raw))
    bad.compression = 7
    with pytest.raises(TensorDecodeError, match="unknown compression"):
        decode_tensor(bad)


def test_compressed_tensor_cannot_claim_a_huge_shape():
    # A few bytes of DEFLATE can expand a thousandfold: the shape alone must not decide the allocation.
    n = MAX_INFLATED_BYTES // 4 + 1
    msg = pb.Tensor(dtype=pb.FLOAT32, shape=[n], data=deflate(b"\x00" * 1024), compression=pb.DEFLATE)
    with pytest.raises(TensorDecodeError, match="at most"):
        decode_tensor(msg)
