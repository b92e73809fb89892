"""The coordinator service's shape and the chunking of its payloads."""

import hashlib

from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.transport import CHUNK_BYTES, MAX_MESSAGE_BYTES, submit_requests


def test_service_methods_and_streaming_kinds():
    svc = cpb.DESCRIPTOR.services_by_name["CoordinatorService"]
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}
    assert kinds == {"Join": (False, False), "GetTask": (False, False), "DownloadModel": (False, True),
                     "SubmitUpdate": (True, False), "Heartbeat": (False, False), "Leave": (False, False)}
    assert cpb.DESCRIPTOR.package == "fedmla.v1"


def test_submit_stream_chunks_stay_under_message_limit_and_reassemble():
    payload = bytes(range(256)) * (3 * CHUNK_BYTES // 256 + 7)
    reqs = list(submit_requests(payload, round_id=4, model_version=3))
    assert reqs[0].HasField("header") and not any(r.HasField("header") for r in reqs[1:])
    assert not reqs[0].data        # the header alone: no payload is read before an upload slot is taken
    assert all(r.ByteSize() < MAX_MESSAGE_BYTES for r in reqs)
    assert b"".join(r.data for r in reqs) == payload
    h = reqs[0].header
    assert (h.round_id, h.model_version, h.total_bytes) == (4, 3, len(payload))
    assert h.payload_sha256 == hashlib.sha256(payload).hexdigest()
