"""Helpers for tests and examples that drive a real coordinator over loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.transport import CoordinatorClient

from .settings import CoordinatorSettings


def settings_for(tmp_path, **kw) -> CoordinatorSettings:
    """Settings of a test coordinator (the product's default codec pipeline). GetTask
    answers at once (``task_long_poll_s=0``) unless a test asks for the long poll."""
    base = dict(store=tmp_path / "store", port=0, preset="tiny", task_long_poll_s=0.0,
                clients_per_round=3, min_replies=2,
                round_timeout_s=30, client_timeout_s=60, max_update_bytes=1 << 20)
    base.update(kw)
    return CoordinatorSettings(**base)


def wait_for(pred, timeout=20.0, every=0.02, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def ready_task(client: CoordinatorClient, timeout=20.0):
    def ready():
        r = client.get_task()
        return r if r.status == cpb.GetTaskResponse.READY else None
    return wait_for(ready, timeout, what="a READY task").task


def make_clients(bg, names, join=True, num_examples=10):
    out = []
    for n in names:
        c = CoordinatorClient(bg.target, bg.call(lambda n=n: bg.store.create_token(n)), timeout=30)
        if join:
            c.join(num_examples=num_examples)
        out.append(c)
    return out


def start_coordinator_process(store: Path, args: list[str], log_path: Path, timeout: float = 60.0
                              ) -> tuple[subprocess.Popen, int]:
    """Start `python -m coordinator.cli coordinator` on port 0; return (process, port)."""
    port_file = store.parent / f"{store.name}.port"
    port_file.unlink(missing_ok=True)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "fedmla.worker.apps.cli", "coordinator", "--store", str(store),
                             "--port", "0", "--port-file", str(port_file), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    deadline = time.time() + timeout
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited with {proc.returncode}; see {log_path}:\n{log_path.read_text()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise TimeoutError(f"coordinator did not start within {timeout}s; see {log_path}")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def download_global(client: CoordinatorClient, model_config_json: str):
    """(weights, codec shared state, ModelVersion) from a full download, checked against
    the model hash (for tests that follow the global model without a worker)."""
    from fedmla.mla_model import MLAConfig
    from fedmla.protos.codec.transfer import decode_full_state
    from fedmla.protos.spec import ModelSpec
    from fedmla.protos.weights import model_hash
    dl = client.download(None)
    if dl.kind != cpb.DownloadModelResponse.CODEC_FULL:
        raise AssertionError(f"a download from nothing should be the full state, got kind {dl.kind}")
    state, shared = decode_full_state(dl.data, ModelSpec.from_config(MLAConfig.model_validate_json(model_config_json)).shapes)
    if model_hash(state) != dl.model.sha256:
        raise AssertionError("the full state does not hash to the announced model version")
    return state, shared, dl.model
