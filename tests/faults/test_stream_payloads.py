"""Upload-stream payload classes the protocol tests do not cover (issue 9 item 3):
duplicate chunks, chunks out of order, a truncated stream, a second or missing header,
and an oversized unchunked message. Each is refused with its typed status, nothing is
recorded as a reply, and the same client's good upload is then accepted."""

import grpc
import pytest


from fedmla.coordinator.server import MAX_MESSAGE_BYTES
from fedmla.coordinator.synthetic import synthetic_update
from fedmla.coordinator.testing import make_clients, ready_task
from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.transport import submit_requests


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


@pytest.mark.coord(clients_per_round=2, min_replies=2, max_update_bytes=8 << 20)
def test_stream_payload_classes_refused_with_typed_status(live_coordinator):
    bg = live_coordinator
    c, _other = make_clients(bg, ["c", "other"])
    t = ready_task(c)
    payload = synthetic_update(t, seed=3).SerializeToString()
    reqs = list(submit_requests(payload, t.round_id, t.model.version, chunk_bytes=2048))
    assert len(reqs) >= 4

    def send(rs):
        return c.stub.SubmitUpdate(iter(rs), metadata=c._metadata, timeout=30)

    second_header = [reqs[0], cpb.SubmitUpdateRequest(header=reqs[0].header, data=reqs[1].data), *reqs[2:]]
    no_header = [cpb.SubmitUpdateRequest(data=r.data) for r in reqs]
    cases = {
        "duplicate chunk": ([*reqs[:2], reqs[1], *reqs[2:]], grpc.StatusCode.RESOURCE_EXHAUSTED, "more than"),
        "duplicate replaces a chunk": ([reqs[0], reqs[1], reqs[1], *reqs[3:]], grpc.StatusCode.INVALID_ARGUMENT,
                                       "SHA-256"),
        "out of order": ([reqs[0], reqs[2], reqs[1], *reqs[3:]], grpc.StatusCode.INVALID_ARGUMENT, "SHA-256"),
        "truncated stream": (reqs[:-1], grpc.StatusCode.INVALID_ARGUMENT, "stream ended"),
        "header only": (reqs[:1] if len(reqs[0].data) < len(payload) else [], grpc.StatusCode.INVALID_ARGUMENT,
                        "stream ended"),
        "second header": (second_header, grpc.StatusCode.INVALID_ARGUMENT, "header"),
        "missing header": (no_header, grpc.StatusCode.INVALID_ARGUMENT, "header"),
    }
    for what, (rs, want, text) in cases.items():
        code, details = _code(lambda: send(rs))
        assert code == want and text in details, (what, code, details)
    # an oversized unchunked message is refused by the transport before any handler runs
    big = b"\x00" * (MAX_MESSAGE_BYTES + (1 << 20))
    ch = grpc.insecure_channel(bg.target, options=[("grpc.max_send_message_length", 64 << 20)])
    try:
        hdr = cpb.SubmitUpdateRequest.Header(round_id=t.round_id, model_version=t.model.version,
                                             total_bytes=len(big), payload_sha256="0" * 64)
        stub_call = ch.stream_unary("/fedmla.v1.CoordinatorService/SubmitUpdate",
                                    request_serializer=cpb.SubmitUpdateRequest.SerializeToString,
                                    response_deserializer=cpb.SubmitUpdateResponse.FromString)
        code, details = _code(lambda: stub_call(iter([cpb.SubmitUpdateRequest(header=hdr, data=big)]),
                                                metadata=c._metadata, timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    finally:
        ch.close()
    assert bg.call(lambda: len(bg.coord.round.replies)) == 0
    # the client can still upload the intact stream
    r = send(reqs)
    assert r.round_id == t.round_id and r.replies_in_round == 1
    assert bg.call(lambda: len(bg.coord.round.replies)) == 1
