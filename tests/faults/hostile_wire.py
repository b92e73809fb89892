"""A hostile client's toolkit: protobuf written byte by byte (its own encoder, not the
project's) and raw gRPC calls with identity serializers.

Only the *layout* of a valid update (which tensors, their shapes and head lists, from the
task's model config, codec config and head mask) comes from the protocol layer; every
byte sent is produced here, so the coordinator sees exactly what an adversary can send:
negative varints, absurd shapes, repeated fields, inflate bombs.
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
import zlib
from dataclasses import dataclass

import grpc

SERVICE = "/fedmla.v1.CoordinatorService/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

# fedmla.v1 enum values (types.proto)
FLOAT32, FLOAT16, INT8, INT4, INT2 = 1, 3, 5, 6, 11
INT8_ROW, INT4_ROW, INT2_ROW = 1, 2, 3
DEFLATE = 1


# ---- protobuf wire format ---------------------------------------------------------------
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1          # int64 negatives: ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_varint(field: int, n: int) -> bytes:
    return varint(field << 3) + varint(n)


def f_bytes(field: int, data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


def f_double(field: int, x: float) -> bytes:
    return varint(field << 3 | 1) + struct.pack("<d", x)


def f_packed(field: int, values) -> bytes:
    return f_bytes(field, b"".join(varint(v) for v in values))


def f_floats(field: int, values) -> bytes:
    return f_bytes(field, b"".join(struct.pack("<f", v) for v in values))


def tensor(dtype: int, shape, data: bytes, scheme: int = 0, scales: bytes | None = None,
           compression: int = 0) -> bytes:
    """fedmla.v1.Tensor: dtype=1, shape=2 (packed int64), data=3, quant=4, compression=5."""
    out = f_varint(1, dtype) + f_packed(2, shape) + f_bytes(3, data)
    if scheme or scales is not None:
        out += f_bytes(4, (f_varint(1, scheme) if scheme else b"") + (f_bytes(2, scales) if scales is not None else b""))
    if compression:
        out += f_varint(5, compression)
    return out


def factor(name: str, left: bytes | None, right: bytes | None, rank: int, heads=None) -> bytes:
    """fedmla.v1.LowRankFactor: name=1, left=2, right=3, rank=4, heads=5 (HeadSelection heads=1)."""
    out = f_bytes(1, name)
    if left is not None:
        out += f_bytes(2, left)
    if right is not None:
        out += f_bytes(3, right)
    out += f_varint(4, rank)
    if heads is not None:
        out += f_bytes(5, f_packed(1, heads))
    return out


def dense(name: str, value: bytes, heads=None) -> bytes:
    """fedmla.v1.DenseUpdate: name=1, value=2, heads=3."""
    return f_bytes(1, name) + f_bytes(2, value) + (f_bytes(3, f_packed(1, heads)) if heads is not None else b"")


def model_update(factors=(), dense_parts=(), importance: tuple[int, int, list[float]] | None = None,
                 num_examples: int | None = 10, metrics: dict[str, float] | None = None, extra: bytes = b"") -> bytes:
    """fedmla.v1.ModelUpdate: factors=1, dense=2, importance=3, num_examples=4, metrics=5 (map)."""
    out = b"".join(f_bytes(1, f) for f in factors) + b"".join(f_bytes(2, d) for d in dense_parts)
    if importance is not None:
        L, H, scores = importance
        out += f_bytes(3, f_varint(1, L) + f_varint(2, H) + f_floats(3, scores))
    if num_examples is not None:
        out += f_varint(4, num_examples)
    for k, v in (metrics or {}).items():
        out += f_bytes(5, f_bytes(1, k) + f_double(2, v))
    return out + extra


def submit_header(round_id: int, version: int, total_bytes: int, sha: str) -> bytes:
    """SubmitUpdateRequest{header=1: Header{round_id=1, model_version=2, total_bytes=3, payload_sha256=4}}."""
    return f_bytes(1, f_varint(1, round_id) + f_varint(2, version) + f_varint(3, total_bytes) + f_bytes(4, sha))


def submit_chunks(payload: bytes, round_id: int, version: int, chunk: int = 64 << 10,
                  total_bytes: int | None = None) -> list[bytes]:
    """The raw SubmitUpdateRequest messages of one upload (header on the first)."""
    total = len(payload) if total_bytes is None else total_bytes
    first = submit_header(round_id, version, total, hashlib.sha256(payload).hexdigest()) + f_bytes(2, payload[:chunk])
    return [first] + [f_bytes(2, payload[o:o + chunk]) for o in range(chunk, len(payload), chunk)]


def deflate_bomb(n_bytes: int, byte: bytes = b"\x00") -> bytes:
    """Raw DEFLATE of ``n_bytes`` copies of ``byte`` (about 1000:1)."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    z = bytearray()
    block = byte * (1 << 20)
    left = n_bytes
    while left > 0:
        z += co.compress(block[:min(left, len(block))])
        left -= len(block)
    return bytes(z + co.flush())


# ---- raw gRPC ------------------------------------------------------------------------------
class RawClient:
    """One identity speaking raw bytes: requests are bytes, responses come back as bytes."""

    def __init__(self, target: str, token: str | None):
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20),
                                                              ("grpc.max_receive_message_length", 64 << 20)])
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def unary(self, method: str, request: bytes, timeout: float = 20.0) -> bytes:
        path = method if method.startswith("/") else SERVICE + method
        return self.channel.unary_unary(path)(request, metadata=self.metadata, timeout=timeout)

    def submit(self, chunks, timeout: float = 30.0) -> bytes:
        return self.channel.stream_unary(SERVICE + "SubmitUpdate")(iter(chunks), metadata=self.metadata,
                                                                    timeout=timeout)

    def submit_future(self, chunks, timeout: float = 30.0):
        return self.channel.stream_unary(SERVICE + "SubmitUpdate").future(iter(chunks), metadata=self.metadata,
                                                                          timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def refusal(fn) -> tuple[grpc.StatusCode, str]:
    """(status code, details) of a call expected to fail; OK and '' when it succeeded."""
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


class Stall:
    """A request iterator that yields ``chunks`` and then blocks until released (bounded by
    ``max_s``), never half-closing before that: a client that stalls mid-stream."""

    def __init__(self, chunks, max_s: float = 60.0):
        self.chunks, self.max_s = list(chunks), max_s
        self.release = threading.Event()
        self.sent = 0

    def __iter__(self):
        for c in self.chunks:
            self.sent += 1
            yield c
        self.release.wait(self.max_s)


# ---- a valid update's layout, built by hand ------------------------------------------------
@dataclass
class Slot:
    name: str
    kind: str                    # "lowrank" | "dense"
    rank: int = 0
    left: tuple[int, int] | None = None     # (r, m) when sent
    right: tuple[int, int] | None = None    # (r, n) when sent
    rows: tuple[int, int] | None = None     # dense (R, C)
    heads: list[int] | None = None


def layout_for(task_bytes: bytes) -> tuple[list[Slot], int, int, int, int]:
    """(slots, factor bits, dense bits, layers, heads) of a round, from a Task's bytes: the
    model config and codec config it carries, and its head mask (first round, svd layout)."""
    import torch

    from fedmla.mla_model import MLAConfig
    from fedmla.protos.codec import CodecConfig
    from fedmla.protos.codec.layout import is_lowrank, selection_for
    from fedmla.protos.fedmla.v1 import types_pb2 as pb
    from fedmla.protos.spec import ModelSpec
    task = pb.Task.FromString(task_bytes)
    mc = MLAConfig.model_validate_json(task.model_config_json)
    cfg = CodecConfig.model_validate_json(task.codec.config_json)
    round_ = task.model.version          # the codec's round is the model version
    assert cfg.method == "svd" or round_ < cfg.powersgd_warmup_rounds, "hand-built layouts are svd (both factors)"
    shapes = ModelSpec.from_config(mc).shapes
    m = task.active_heads
    mask = torch.tensor(list(m.active)).reshape(m.num_layers, m.num_heads)
    slots = []
    for name, shape in shapes.items():
        sel = selection_for(name, shape, mc, cfg, mask)
        sub = sel.sub_shape(shape)
        if not is_lowrank(shape, cfg):
            if round_ % cfg.dense_every == 0:
                rows = (1, math.prod(sub)) if len(sub) < 2 else tuple(sub)
                slots.append(Slot(name, "dense", rows=rows, heads=sel.heads))
            continue
        mm, nn = sub
        r = min(cfg.rank, mm, nn)
        slots.append(Slot(name, "lowrank", rank=r, left=(r, mm), right=(r, nn), heads=sel.heads))
    return slots, cfg.factor_bits, cfg.dense_bits, mc.n_layers, mc.n_heads


def quant_tensor(shape: tuple[int, int], bits: int, *, data: bytes | None = None, compression: int = 0,
                 scales: bytes | None = None) -> bytes:
    """An all-zero (R, C) tensor at ``bits`` (0: float32), or with the given data/scales."""
    R, C = shape
    if not bits:
        return tensor(FLOAT32, [R, C], b"\x00" * (4 * R * C) if data is None else data, compression=compression)
    width = 4 if bits == 3 else bits
    dtype, scheme = {8: (INT8, INT8_ROW), 4: (INT4, INT4_ROW), 2: (INT2, INT2_ROW)}[width]
    row_bytes = math.ceil(C * width / 8)
    if data is None:
        # code 0 is a valid level at every width (2-bit codes travel as q + 2); DEFLATEd,
        # as an honest encoder sends codes that compress
        data = deflate_bomb(R * row_bytes, b"\xaa" if width == 2 else b"\x00")
        compression = compression or DEFLATE
    if scales is None:
        scales = tensor(FLOAT32, [R], b"\x00" * (4 * R))
    return tensor(dtype, [R, C], data, scheme=scheme, scales=scales, compression=compression)


def valid_update(task_bytes: bytes, num_examples: int = 10, metrics: dict | None = None,
                 tamper=None) -> bytes:
    """A well-formed all-zero update for the task's round; ``tamper(slot, parts)`` may
    replace the parts of one tensor: it returns a dict {'factor'|'dense': bytes} or None."""
    slots, fbits, dbits, L, H = layout_for(task_bytes)
    factors, denses = [], []
    for s in slots:
        custom = tamper(s) if tamper else None
        if custom is not None:
            factors.extend(custom.get("factors", []))
            denses.extend(custom.get("dense", []))
            continue
        if s.kind == "dense":
            denses.append(dense(s.name, quant_tensor(s.rows, dbits), s.heads))
        else:
            factors.append(factor(s.name, quant_tensor(s.left, fbits) if s.left else None,
                                  quant_tensor(s.right, fbits) if s.right else None, s.rank, s.heads))
    return model_update(factors, denses, importance=(L, H, [1.0] * (L * H)), num_examples=num_examples,
                        metrics={"loss": 2.0} if metrics is None else metrics)
