"""A worker process for the fault tests: uploads a prepared ModelUpdate with CoordinatorClient's
request stream, optionally slowly (a pause between chunks) so a SIGKILL lands mid-upload.

    python tests/faults/synthetic_worker.py TARGET TOKEN PAYLOAD_FILE ROUND VERSION CHUNK_BYTES PAUSE_S

Prints ``uploading`` once the first chunk has been handed to gRPC and ``done <replies>`` at the end.
Imports no torch (starts fast); never deserialises anything it receives beyond protobuf replies.
"""

import sys
import time
from pathlib import Path


def main(argv):
    target, token, path, rid, ver, chunk, pause = argv
    from fedmla.protos.transport import CoordinatorClient, submit_requests
    payload = Path(path).read_bytes()
    client = CoordinatorClient(target, token, timeout=120)

    def slow():
        for i, req in enumerate(submit_requests(payload, int(rid), int(ver), int(chunk))):
            yield req
            if i == 0:
                print("uploading", flush=True)
            time.sleep(float(pause))

    r = client.stub.SubmitUpdate(slow(), metadata=client._metadata, timeout=120)
    print("done", r.replies_in_round, flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1:])
