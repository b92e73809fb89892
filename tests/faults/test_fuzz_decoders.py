"""Property-based fuzzing (issue 9 item 3): decoders and raw bytes to every RPC.

Decoders must only raise their typed errors on arbitrary input; a live coordinator
given random bytes on every RPC must answer with a gRPC status, keep serving, leave
its state (round, model hash) unchanged and keep its RSS bounded.
CI runs a modest number of examples; ``--run-slow`` runs the full variant.
"""

import os

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings, strategies as st

from fedmla.coordinator.errors import CoordinatorError
from fedmla.coordinator.inprocess import BackgroundCoordinator
from fedmla.coordinator.synthetic import synthetic_update
from fedmla.coordinator.testing import make_clients, ready_task, settings_for
from fedmla.protos.weights import sha256_hex
from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import TensorDecodeError, decode_int_rows, decode_tensor

TYPED = (CoordinatorError, TensorDecodeError, DecodeError)
FAST = dict(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
FULL = dict(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    bg = BackgroundCoordinator(settings_for(tmp_path_factory.mktemp("fuzz"), clients_per_round=2, min_replies=2,
                                            max_update_bytes=256 << 10)).start()
    try:
        client, _other = make_clients(bg, ["fuzzer", "other"])
        task = ready_task(client)
        good = synthetic_update(task, seed=1).SerializeToString()
        yield bg, client, task, good
    finally:
        bg.stop()


def _decode_bytes(bg, raw: bytes):
    try:
        msg = pb.ModelUpdate.FromString(raw)
    except DecodeError:
        return "parse"
    try:
        bg.coord.ingest.decode(msg, bg.coord.round)     # the round's codec plan, as at submit
        return "ok"
    except TYPED:
        return "typed"


def _mutate(good: bytes, data) -> bytes:
    b = bytearray(good)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(b) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "cut", "dup"]))
        if op == "flip":
            b[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            b[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del b[i:i + data.draw(st.integers(1, 64))]
        else:
            b[i:i] = b[i:i + data.draw(st.integers(1, 64))]
        if not b:
            break
    return bytes(b)


def _check_decoders(live, data):
    bg, _, _, good = live
    mode = data.draw(st.sampled_from(["raw", "mutated"]))
    raw = data.draw(st.binary(max_size=4096)) if mode == "raw" else _mutate(good, data)
    assert _decode_bytes(bg, raw) in ("parse", "typed", "ok")


@given(data=st.data())
@settings(**FAST)
def test_fuzz_update_decoder_fast(live, data):
    _check_decoders(live, data)


@pytest.mark.slow
@given(data=st.data())
@settings(**FULL)
def test_fuzz_update_decoder_full(live, data):
    _check_decoders(live, data)


tensor_msgs = st.builds(
    pb.Tensor,
    dtype=st.integers(-3, 40),
    shape=st.lists(st.integers(-4, 1 << 40), max_size=5),
    data=st.binary(max_size=512),
)


@given(t=tensor_msgs, scheme=st.integers(0, 5), max_el=st.none() | st.integers(0, 10_000))
@settings(**FAST)
def test_fuzz_tensor_decoders(t, scheme, max_el):
    if scheme:
        t.quant.scheme = scheme
    for fn in (lambda: decode_tensor(t, max_elements=max_el), lambda: decode_int_rows(t, max_elements=max_el)):
        try:
            fn()
        except TensorDecodeError:
            pass


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


RPCS = {"Join": "unary", "GetTask": "unary", "Heartbeat": "unary", "Leave": "unary",
        "DownloadModel": "unary_stream", "SubmitUpdate": "stream_unary"}


def _raw_call(channel, rpc, payloads, metadata):
    path = f"/fedmla.v1.CoordinatorService/{rpc}"
    kind = RPCS[rpc]
    try:
        if kind == "unary":
            channel.unary_unary(path)(payloads[0], metadata=metadata, timeout=10)
        elif kind == "unary_stream":
            for _ in channel.unary_stream(path)(payloads[0], metadata=metadata, timeout=10):
                pass
        else:
            channel.stream_unary(path)(iter(payloads), metadata=metadata, timeout=10)
    except grpc.RpcError as e:
        # Every failure is typed: bytes that do not parse as the request type get
        # INVALID_ARGUMENT naming it (the coordinator parses requests itself), never UNKNOWN.
        assert e.code() != grpc.StatusCode.UNKNOWN, f"{rpc}: untyped failure {e.details()}"
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT and "is not a serialized" in (e.details() or ""):
            req = getattr(cpb, f"{rpc}Request")
            assert req.DESCRIPTOR.full_name in e.details()
            assert not all(_parses(req, p) for p in payloads), f"{rpc}: parseable bytes refused as unparseable"
        return e.code()
    return grpc.StatusCode.OK


def _parses(cls, raw: bytes) -> bool:
    try:
        cls.FromString(raw)
        return True
    except DecodeError:
        return False


def _state(bg):
    return bg.call(lambda: (bg.store.rounds(), bg.coord.model_sha))


def _fuzz_rpcs(live, data, stats):
    bg, client, _, _ = live
    rpc = data.draw(st.sampled_from(sorted(RPCS)))
    payloads = data.draw(st.lists(st.binary(max_size=2048), min_size=1, max_size=4))
    auth = data.draw(st.sampled_from(["valid", "none", "garbage"]))
    md = {"valid": client._metadata, "none": (), "garbage": (("authorization", "Bearer xyz"),)}[auth]
    before = _state(bg)
    code = _raw_call(client.channel, rpc, payloads, md)
    stats.setdefault(rpc, {}).setdefault(code.name, 0)
    stats[rpc][code.name] += 1
    after = _state(bg)
    if rpc != "SubmitUpdate" or code != grpc.StatusCode.OK:
        assert after == before


def _run_rpc_fuzz(live, cfg):
    bg, client, _, _ = live
    stats: dict = {}
    rss0 = _rss_mb()
    start = _state(bg)

    @given(data=st.data())
    @settings(**cfg)
    def run(data):
        _fuzz_rpcs(live, data, stats)

    run()
    # still serving, with the same task, and memory bounded (generous: this process hosts the server)
    # (a garbage Leave/Join with valid auth may change this client's membership, not the run)
    (probe,) = make_clients(bg, [f"probe{len(stats)}-{rss0:.0f}"])
    probe.get_task()
    probe.channel.close()
    assert _state(bg) == start
    assert _rss_mb() - rss0 < 300, stats
    print("rpc fuzz status counts:", stats)
    return stats


def test_fuzz_raw_bytes_every_rpc_fast(live):
    stats = _run_rpc_fuzz(live, dict(FAST, max_examples=300))
    assert sum(sum(v.values()) for v in stats.values()) >= 300


@pytest.mark.slow
def test_fuzz_raw_bytes_every_rpc_full(live):
    _run_rpc_fuzz(live, dict(FULL, max_examples=1000))


def test_zero_element_shape_with_huge_dims_is_refused():
    """Found by hypothesis: a 0-element shape whose other dimensions overflow torch's
    stride arithmetic used to raise RuntimeError instead of TensorDecodeError."""
    from fedmla.protos.tensors import TensorDecodeError, decode_tensor
    bad = pb.Tensor(dtype=pb.FLOAT32, shape=[0, 209, 1265, 1265, 27_577_976_025], data=b"")
    with pytest.raises(TensorDecodeError, match="too large to address"):
        decode_tensor(bad, "t")
    assert tuple(decode_tensor(pb.Tensor(dtype=pb.FLOAT32, shape=[0, 3], data=b""), "t").shape) == (0, 3)


def test_unparseable_request_bytes_get_invalid_argument_naming_the_type(tmp_path):
    with BackgroundCoordinator(settings_for(tmp_path)) as bg:
        (client,) = make_clients(bg, ["alice"])
        garbage = [b"\xff\xff\xff\xff"]          # an invalid varint: no protobuf message parses it
        for rpc in sorted(RPCS):
            with pytest.raises(grpc.RpcError) as e:
                path = f"/fedmla.v1.CoordinatorService/{rpc}"
                kind = RPCS[rpc]
                if kind == "unary":
                    client.channel.unary_unary(path)(garbage[0], metadata=client._metadata, timeout=10)
                elif kind == "unary_stream":
                    list(client.channel.unary_stream(path)(garbage[0], metadata=client._metadata, timeout=10))
                else:
                    client.channel.stream_unary(path)(iter(garbage), metadata=client._metadata, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, e.value.code())
            assert f"fedmla.v1.{rpc}Request" in e.value.details(), e.value.details()
        assert client.get_task().status in (1, 2)     # still serving
        client.close()
