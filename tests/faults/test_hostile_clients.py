"""Issue 15: an adversarial client speaking raw protobuf over raw gRPC (tests/faults/
hostile_wire.py writes every byte) against a live codec coordinator with two honest
clients beside it.

For every class of hostile input (absurd and negative counts, empty and partial updates,
unbounded metrics, duplicate and unknown names, wrong plans, inflate bombs in every
compressed field, oversized echoed strings, stalls, starved upload slots, garbage to the
health service) the test asserts the typed status, that nothing was stored for the hostile
client, and that the honest clients still commit. RSS of a coordinator *process* under
hostile uploads is measured in ``test_hostile_uploads_keep_coordinator_rss_bounded``.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import grpc
import pytest

from fedmla.coordinator.inprocess import BackgroundCoordinator
from fedmla.coordinator.settings import CoordinatorSettings
from fedmla.coordinator.synthetic import SyntheticCodecClient
from fedmla.coordinator.testing import make_clients, ready_task, settings_for, wait_for
from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb

from hostile_wire import (DEFLATE, FLOAT32, HEALTH_CHECK, INT4, INT4_ROW, RawClient, Stall, deflate_bomb, factor, layout_for,
                          model_update, quant_tensor, refusal, submit_chunks, submit_header, tensor, valid_update,
                          f_bytes)

SC = grpc.StatusCode
MAX_STATUS_CHARS = 1024


def _settings(tmp_path, **kw) -> CoordinatorSettings:
    # A coordinator with the CLI's default update size limit (64 MiB). Settings
    # this code base does not know are dropped, so the file also runs against older code.
    base = dict(clients_per_round=3, min_replies=2, round_timeout_s=60,
                max_update_bytes=64 << 20)
    base.update(kw)
    known = CoordinatorSettings.model_fields
    return settings_for(tmp_path, **{k: v for k, v in base.items() if k in known})


class Scene:
    """A coordinator with two honest codec clients and one hostile raw client, all joined,
    the round open and the hostile client's task in hand."""

    def __init__(self, tmp_path, **kw):
        self.bg = BackgroundCoordinator(_settings(tmp_path, **kw)).start()
        self.honest = make_clients(self.bg, ["honest-a", "honest-b"])
        self.raw = self.hostile("mallory")
        self.task = self.ready(self.raw)
        t = cpb.GetTaskResponse.FromString(self.raw.unary("GetTask", b"")).task
        self.round_id, self.version = t.round_id, t.model.version

    def hostile(self, name: str) -> RawClient:
        raw = RawClient(self.bg.target, self.bg.call(lambda: self.bg.store.create_token(name)))
        raw.unary("Join", b"")
        return raw

    @staticmethod
    def ready(raw: RawClient) -> bytes:
        def get():
            r = cpb.GetTaskResponse.FromString(raw.unary("GetTask", b""))
            return r.task.SerializeToString() if r.status == cpb.GetTaskResponse.READY else None
        return wait_for(get, 30, 0.05, "a READY task for the hostile client")

    def send(self, payload: bytes, **kw) -> tuple[SC, str]:
        return refusal(lambda: self.raw.submit(submit_chunks(payload, self.round_id, self.version, **kw)))

    def finish(self, leave=("mallory",)) -> tuple[dict, dict]:
        """Hostile clients leave, honest ones submit; (the round's row, client rows by name)."""
        if "mallory" in leave:
            self.raw.unary("Leave", b"")
        for c, name in zip(self.honest, ["honest-a", "honest-b"]):
            t = ready_task(c)
            c.submit(SyntheticCodecClient(c, name).update_for(t), t.round_id, t.model.version)
        rid = self.round_id
        rnd = wait_for(lambda: next((r for r in self.bg.call(self.bg.store.rounds) if r["id"] == rid), None), 60,
                       0.05, f"round {rid} to end")
        rows = {r["client"]: r for r in self.bg.call(lambda: self.bg.store.client_rounds(rid))}
        return rnd, rows

    def spooled(self) -> list[str]:
        root = self.bg.coord.spool_root
        return sorted(p.name for p in root.rglob("*.pb")) if root.exists() else []

    def close(self):
        for c in self.honest:
            c.close()
        self.raw.close()
        self.bg.stop()


@pytest.fixture
def scene(tmp_path, request):
    marker = request.node.get_closest_marker("coord")
    s = Scene(tmp_path, **(marker.kwargs if marker else {}))
    try:
        yield s
    finally:
        s.close()


def _typed(code: SC, details: str, want: SC, text: str, what: str) -> None:
    assert code == want and text in details, (what, code, details[:300])
    assert 0 < len(details) <= MAX_STATUS_CHARS, (what, len(details))
    assert "x" * 100 not in details, (what, "client text echoed untruncated")


def _committed_without(rnd: dict, rows: dict, who: str = "mallory") -> None:
    assert rnd["status"] == "committed" and rnd["replied"] == 2, rnd
    assert rows[who]["status"] in ("rejected", "dropped"), rows[who]
    assert not rows[who]["num_examples"] and rows[who]["bytes_up"] == 0, rows[who]
    assert rows[who]["metrics"] in (None, "", "{}"), rows[who]
    assert len(rows[who]["rejection_reason"] or "") <= MAX_STATUS_CHARS, rows[who]["rejection_reason"][:200]
    assert all(rows[h]["status"] == "replied" for h in ("honest-a", "honest-b")), rows


# ---- 1. weight grab ------------------------------------------------------------------------------
def test_weight_grab_with_absurd_example_count_is_refused(scene):
    for n, label in [(2 ** 62, "2^62"), (1_000_001, "cap + 1"), (-5, "negative"), (0, "zero"), (-(2 ** 63), "min int64")]:
        code, details = scene.send(valid_update(scene.task, num_examples=n))
        _typed(code, details, SC.INVALID_ARGUMENT, "num_examples", label)
    assert scene.bg.call(lambda: len(scene.bg.coord.round.replies)) == 0
    rnd, rows = scene.finish()
    _committed_without(rnd, rows)


def test_client_weight_in_the_mean_is_bounded_by_the_median(tmp_path):
    """A count under the cap still cannot carry the mean: weights are clipped to
    max_weight_multiple x the round's median count."""
    from fedmla.coordinator.bounds import bounded_weights
    assert bounded_weights({"a": 10, "b": 10, "m": 1_000_000}, 10.0) == {"a": 10, "b": 10, "m": 100}
    assert bounded_weights({"a": 10, "b": 30}, 10.0) == {"a": 10, "b": 30}
    w = bounded_weights({"a": 10, "b": 10, "m": 1_000_000}, 10.0)
    assert w["m"] / sum(w.values()) < 0.9


# ---- 2. empty update ------------------------------------------------------------------------------
def test_update_with_nothing_to_aggregate_is_refused(scene):
    slots, *_ = layout_for(scene.task)
    cases = {
        "no tensors": model_update(num_examples=10),
        "importance only": model_update(importance=(2, 4, [1.0] * 8), num_examples=10),
        "one tensor of the plan missing": valid_update(scene.task, tamper=lambda s: {} if s.name == slots[-1].name
                                                       else None),
    }
    for what, payload in cases.items():
        code, details = scene.send(payload)
        _typed(code, details, SC.INVALID_ARGUMENT, "no tensors" if "missing" not in what else "lacks", what)
    rnd, rows = scene.finish()
    _committed_without(rnd, rows)


# ---- 3. unbounded metrics ------------------------------------------------------------------------
def test_metrics_are_bounded_in_count_and_size(scene):
    many = {f"m{i}": 1.0 for i in range(100_000)}
    cases = [
        ("100k metrics", valid_update(scene.task, metrics=many), SC.RESOURCE_EXHAUSTED, "limit"),
        ("33 metrics", valid_update(scene.task, metrics={f"m{i}": 1.0 for i in range(33)}), SC.INVALID_ARGUMENT,
         "max_metrics"),
        ("16 KiB metric name", valid_update(scene.task, metrics={"x" * (16 << 10): 1.0}), SC.INVALID_ARGUMENT,
         "metric name"),
        ("empty metric name", valid_update(scene.task, metrics={"": 1.0}), SC.INVALID_ARGUMENT, "metric name"),
        ("nan metric", valid_update(scene.task, metrics={"loss": math.nan}), SC.INVALID_ARGUMENT, "finite"),
    ]
    for what, payload, want, text in cases:
        code, details = scene.send(payload)
        _typed(code, details, want, text, what)
    rnd, rows = scene.finish()
    _committed_without(rnd, rows)


# ---- 6. echoed input too large to refuse ------------------------------------------------------
def test_echoed_client_strings_are_truncated_so_the_refusal_arrives(scene):
    slots, fbits, *_ = layout_for(scene.task)
    s0 = next(s for s in slots if s.kind == "lowrank")

    def named(name):
        return valid_update(scene.task, tamper=lambda s: {"factors": [
            factor(name, quant_tensor(s.left, fbits), quant_tensor(s.right, fbits), s.rank, s.heads)]}
            if s.name == s0.name else None)
    for size in (16 << 10, 1 << 10):
        code, details = scene.send(named("x" * size))
        _typed(code, details, SC.INVALID_ARGUMENT, "unknown parameter", f"{size}-char name")
        assert f"+{size - 64} chars" in details, details
    # a 64 KiB name makes the update larger than any update of this plan: refused unread
    code, details = scene.send(named("x" * (64 << 10)))
    _typed(code, details, SC.RESOURCE_EXHAUSTED, "limit", "64 KiB name")
    rnd, rows = scene.finish()
    _committed_without(rnd, rows)


# ---- shapes, names, plans, headers -----------------------------------------------------------
def test_wrong_shapes_names_plans_and_headers_are_refused(scene):
    slots, fbits, dbits, L, H = layout_for(scene.task)
    per_head = [s for s in slots if s.kind == "lowrank" and (s.heads or ".attn.w" in s.name)]
    s0 = next((s for s in per_head if s.heads), per_head[0])     # the first round's mask may hold every head

    def with_factor(**kw):
        def tamper(s):
            if s.name != s0.name:
                return None
            args = dict(name=s.name, left=quant_tensor(s.left, fbits), right=quant_tensor(s.right, fbits),
                        rank=s.rank, heads=s.heads)
            args.update(kw)
            return {"factors": [factor(**args)]}
        return valid_update(scene.task, tamper=tamper)

    def dup(s):
        if s.name == s0.name:
            f = factor(s.name, quant_tensor(s.left, fbits), quant_tensor(s.right, fbits), s.rank, s.heads)
            return {"factors": [f, f]}
    z4 = tensor(FLOAT32, [4], b"\x00" * 16)
    other_heads = ([h for h in range(H) if h not in s0.heads][:1] + s0.heads[1:]) if s0.heads else [0]
    cases = [
        ("duplicate name", valid_update(scene.task, tamper=dup), SC.INVALID_ARGUMENT, "sent twice"),
        ("unknown name", with_factor(name="layers.9.nope"), SC.INVALID_ARGUMENT, "unknown parameter"),
        ("wrong heads (another plan)", with_factor(heads=sorted(other_heads)), SC.INVALID_ARGUMENT, "covers heads"),
        ("all heads (no plan)", with_factor(heads=None), SC.INVALID_ARGUMENT, "covers heads") if s0.heads else None,
        ("head list longer than the model", with_factor(heads=list(range(200))), SC.INVALID_ARGUMENT,
         "head indices"),
        ("negative heads", with_factor(heads=[-1, -2]), SC.INVALID_ARGUMENT, "covers heads"),
        ("wrong rank", with_factor(rank=s0.rank + 1), SC.INVALID_ARGUMENT, "rank"),
        ("negative rank", with_factor(rank=-7), SC.INVALID_ARGUMENT, "rank"),
        ("absurd shape", with_factor(left=tensor(INT4, [1 << 40, 1 << 40], b"", scheme=INT4_ROW, scales=z4)),
         SC.INVALID_ARGUMENT, "too large"),
        ("shape beyond the plan", with_factor(left=tensor(INT4, [s0.left[0], 1 << 20], b"", scheme=INT4_ROW, scales=z4)),
         SC.INVALID_ARGUMENT, "elements exceeds"),
        ("negative dims", with_factor(left=tensor(INT4, [-1, 5], b"", scheme=INT4_ROW, scales=z4)), SC.INVALID_ARGUMENT,
         "negative"),
        ("float64 left", with_factor(left=tensor(4, list(s0.left), b"\x00" * (8 * math.prod(s0.left)))),
         SC.INVALID_ARGUMENT, ""),
        ("dense where low-rank", valid_update(scene.task, tamper=lambda s: {"dense": [
            f_bytes(1, s.name) + f_bytes(2, quant_tensor((1, 4), dbits))]} if s.name == s0.name else None),
         SC.INVALID_ARGUMENT, "low-rank"),
        ("importance of another model", model_update(
            [factor(s0.name, quant_tensor(s0.left, fbits), quant_tensor(s0.right, fbits), s0.rank, s0.heads)],
            importance=(L + 1, H, [1.0] * ((L + 1) * H))), SC.INVALID_ARGUMENT, ""),
        ("not a ModelUpdate", b"\xff" * 64, SC.INVALID_ARGUMENT, "ModelUpdate"),
        ("unknown field 1000 of 1 MiB", valid_update(scene.task) + f_bytes(1000, b"\x00" * (1 << 20)),
         SC.RESOURCE_EXHAUSTED, "limit"),
    ]
    for what, payload, want, text in filter(None, cases):
        code, details = scene.send(payload)
        _typed(code, details, want, text, what)
    good = valid_update(scene.task)
    header_cases = [
        ("next round", [submit_header(scene.round_id + 1, scene.version, len(good), "0" * 64)],
         SC.FAILED_PRECONDITION, "round"),
        ("negative round", [submit_header(-1, scene.version, len(good), "0" * 64)], SC.FAILED_PRECONDITION, "round"),
        ("old version", [submit_header(scene.round_id, scene.version - 1, len(good), "0" * 64)],
         SC.FAILED_PRECONDITION, "version"),
        ("negative size", [submit_header(scene.round_id, scene.version, -1, "0" * 64)], SC.INVALID_ARGUMENT,
         "total_bytes"),
        ("60 MiB announced", [submit_header(scene.round_id, scene.version, 60 << 20, "0" * 64)],
         SC.RESOURCE_EXHAUSTED, "limit"),
        ("2^62 announced", [submit_header(scene.round_id, scene.version, 2 ** 62, "0" * 64)],
         SC.RESOURCE_EXHAUSTED, "limit"),
        ("more than announced", submit_chunks(good, scene.round_id, scene.version, total_bytes=len(good) - 1),
         SC.RESOURCE_EXHAUSTED, "more than"),
        ("64 KiB sha", [submit_header(scene.round_id, scene.version, len(good), "f" * (64 << 10)) + f_bytes(2, good)],
         SC.INVALID_ARGUMENT, "SHA-256"),
    ]
    for what, chunks, want, text in header_cases:
        code, details = refusal(lambda: scene.raw.submit(chunks))
        _typed(code, details, want, text, what)
    assert scene.spooled() == []
    rnd, rows = scene.finish()
    _committed_without(rnd, rows)


# ---- inflate bombs in every compressed field --------------------------------------------------
def test_inflate_bombs_in_every_compressed_field_are_refused_before_inflating(scene):
    slots, fbits, dbits, L, H = layout_for(scene.task)
    s0 = next(s for s in slots if s.kind == "lowrank")
    d0 = next(s for s in slots if s.kind == "dense")
    bomb = deflate_bomb(8 << 20)          # 8 MiB of zeros in ~8 KB: fits any update size limit
    scales_bomb = tensor(FLOAT32, [2 << 20], bomb, compression=DEFLATE)   # claims 2M scales
    row_scales_bomb = tensor(FLOAT32, [s0.left[0]], bomb, compression=DEFLATE)  # right count, inflates too far

    def on_factor(side, t):
        def tamper(s):
            if s.name != s0.name:
                return None
            left = t if side == "left" else quant_tensor(s.left, fbits)
            right = t if side == "right" else quant_tensor(s.right, fbits)
            return {"factors": [factor(s.name, left, right, s.rank, s.heads)]}
        return valid_update(scene.task, tamper=tamper)

    def on_dense(t):
        return valid_update(scene.task, tamper=lambda s: {"dense": [f_bytes(1, s.name) + f_bytes(2, t)] + (
            [f_bytes(3, f_bytes(1, b"".join(bytes([h]) for h in s.heads)))] if s.heads else [])}
            if s.name == d0.name else None)

    cases = {
        "factor codes": on_factor("left", quant_tensor(s0.left, fbits, data=bomb, compression=DEFLATE)),
        "factor scales (2M claimed)": on_factor("left", quant_tensor(s0.left, fbits, scales=scales_bomb)),
        "factor scales (right count)": on_factor("right", quant_tensor(s0.right, fbits, scales=row_scales_bomb)),
        "dense codes": on_dense(quant_tensor(d0.rows, dbits, data=bomb, compression=DEFLATE)),
        "dense scales": on_dense(quant_tensor(d0.rows, dbits, scales=scales_bomb)),
        "float32 claiming the plan, inflating to 8 MiB": on_factor("left", tensor(FLOAT32, list(s0.left), bomb,
                                                                                  compression=DEFLATE)),
        "unknown compression": on_factor("left", quant_tensor(s0.left, fbits, compression=7)),
    }
    for what, payload in cases.items():
        code, details = scene.send(payload)
        _typed(code, details, SC.INVALID_ARGUMENT, "", what)
    assert scene.spooled() == []
    rnd, rows = scene.finish()
    _committed_without(rnd, rows)


def test_scales_bomb_is_refused_by_its_shape_before_inflating():
    """The codec decoder bounds quant.scales to one per row from the shape: a 16 MiB
    bomb there is refused without being inflated (it used to be inflated, then refused)."""
    import tracemalloc

    from fedmla.protos.fedmla.v1 import types_pb2 as pb
    from fedmla.protos.tensors import TensorDecodeError, decode_int_rows
    msg = pb.Tensor.FromString(quant_tensor((4, 32), 8, scales=tensor(FLOAT32, [4 << 20], deflate_bomb(16 << 20),
                                                                      compression=DEFLATE)))
    tracemalloc.start()
    try:
        with pytest.raises(TensorDecodeError, match="scales: 4194304 elements exceeds the limit of 4"):
            decode_int_rows(msg, "w", max_elements=128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20), peak


# ---- 7. health service -------------------------------------------------------------------------
def test_health_service_answers_garbage_typed_and_does_not_flood_the_log(scene, caplog):
    anon = RawClient(scene.bg.target, None)        # the health service needs no token
    try:
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            for i in range(20):
                code, details = refusal(lambda: anon.unary(HEALTH_CHECK, b"\xff\xff\xff\xff" * (i + 1)))
                assert code == SC.INVALID_ARGUMENT and "grpc.health.v1.HealthCheckRequest" in details, (code, details)
            code, details = refusal(lambda: anon.unary(HEALTH_CHECK, f_bytes(1, "x" * (64 << 10))))
            assert code == SC.INVALID_ARGUMENT and len(details) <= MAX_STATUS_CHARS, (code, details[:200])
            ok = anon.unary(HEALTH_CHECK, b"")       # a well-formed check still answers
        assert ok == b"\x08\x01"                     # status: SERVING
        noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(noisy) <= 2, [r.getMessage()[:200] for r in noisy]
        assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
        assert all("\n" not in r.getMessage() for r in noisy)
    finally:
        anon.close()
    rnd, rows = scene.finish()
    assert rnd["status"] == "committed"


# ---- 4. slowloris --------------------------------------------------------------------------------
@pytest.mark.coord(upload_idle_timeout_s=1.0)
def test_stalled_upload_streams_are_ended_by_the_idle_timeout(scene):
    good = valid_update(scene.task)
    chunks = submit_chunks(good, scene.round_id, scene.version, chunk=1024)
    stalls = {
        "before the header": [],
        "after the header only": [submit_header(scene.round_id, scene.version, len(good),
                                                 __import__("hashlib").sha256(good).hexdigest())],
        "mid-payload": chunks[:2],
        "all sent, never half-closed": chunks,
    }
    for what, sent in stalls.items():
        st = Stall(sent, max_s=30)
        code, details = refusal(lambda: scene.raw.submit(st, timeout=25))
        st.release.set()
        assert code == SC.DEADLINE_EXCEEDED and "no chunk" in details, (what, code, details)
    rnd, rows = scene.finish()
    _committed_without(rnd, rows)


@pytest.mark.coord(round_timeout_s=8, upload_idle_timeout_s=60)
def test_round_deadline_ends_an_open_stream_whatever_it_sends(scene):
    """A client without a deadline of its own that sends one chunk and stalls cannot hold
    the round open: the round's deadline ends the stream and the round commits."""
    for c, name in zip(scene.honest, ["honest-a", "honest-b"]):
        t = ready_task(c)
        c.submit(SyntheticCodecClient(c, name).update_for(t), t.round_id, t.model.version)
    good = valid_update(scene.task)
    st = Stall(submit_chunks(good, scene.round_id, scene.version, chunk=1024)[:1], max_s=40)
    fut = scene.raw.submit_future(st, timeout=35)      # the test's own bound, far past the round's
    try:
        rid = scene.round_id
        rnd = wait_for(lambda: next((r for r in scene.bg.call(scene.bg.store.rounds) if r["id"] == rid), None), 30,
                       0.1, "the round to end while the stream is open")
        code, details = refusal(fut.result)
    finally:
        st.release.set()
    assert rnd["status"] == "committed" and rnd["replied"] == 2, rnd
    assert code in (SC.DEADLINE_EXCEEDED, SC.FAILED_PRECONDITION) and "deadline" in details, (code, details)


# ---- 5. upload slots starved -------------------------------------------------------------------
@pytest.mark.coord(max_concurrent_uploads=2, upload_idle_timeout_s=20)
def test_one_identity_cannot_starve_the_upload_slots(scene):
    stalls, futs = [], []
    try:
        for _ in range(10):                        # ten streams that send nothing
            st = Stall([], max_s=30)
            stalls.append(st)
            futs.append(scene.raw.submit_future(st, timeout=25))
        # one of them may wait for data; the others are refused at once
        refused = wait_for(lambda: [f for f in futs if f.done()] if sum(f.done() for f in futs) >= 9 else None, 15,
                           0.05, "9 of 10 parallel streams of one identity to be refused")
        for f in refused:
            code, details = refusal(f.result)
            assert code == SC.RESOURCE_EXHAUSTED and "in flight" in details, (code, details)
        # honest uploads go through while the hostile stream is open
        assert not futs[[f.done() for f in futs].index(False)].done()
        rnd, rows = scene.finish()
    finally:
        for st in stalls:
            st.release.set()
    assert rows["honest-a"]["status"] == "replied" and rows["honest-b"]["status"] == "replied", rows


# ---- memory: a coordinator process under hostile uploads ------------------------------------
def _proc_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


_BOMBS: dict[int, bytes] = {}


def _bomb(n: int) -> bytes:
    if n not in _BOMBS:
        _BOMBS[n] = deflate_bomb(n)
    return _BOMBS[n]


def _hostile_payloads(task: bytes, heavy: bool) -> dict[str, bytes]:
    """Every kind of large hostile upload: the inflate bombs the issue measured (a 261 kB
    update whose quant.scales inflates to 256 MiB; a 60 MiB update), bombs within any size
    limit in every compressed field, 100k metrics."""
    slots, fbits, dbits, *_ = layout_for(task)
    s0 = next(s for s in slots if s.kind == "lowrank")
    d0 = next(s for s in slots if s.kind == "dense")

    def on_left(t):
        return valid_update(task, tamper=lambda s: {"factors": [factor(s.name, t, quant_tensor(s.right, fbits),
                                                                       s.rank, s.heads)]} if s.name == s0.name else None)
    out = {
        "scales bomb 256 MiB": on_left(quant_tensor(s0.left, fbits, scales=tensor(
            FLOAT32, [64 << 20], _bomb(256 << 20), compression=DEFLATE))),
        "60 MiB update": valid_update(task) + f_bytes(1000, b"\x01" * (60 << 20)),
        "codes bomb 8 MiB": on_left(quant_tensor(s0.left, fbits, data=_bomb(8 << 20), compression=DEFLATE)),
        "scales bomb 8 MiB": on_left(quant_tensor(s0.left, fbits, scales=tensor(FLOAT32, [2 << 20], _bomb(8 << 20),
                                                                                 compression=DEFLATE))),
        "dense bomb 8 MiB": valid_update(task, tamper=lambda s: {"dense": [f_bytes(1, s.name) + f_bytes(
            2, quant_tensor(s.rows, dbits, data=_bomb(8 << 20), compression=DEFLATE))]} if s.name == d0.name else None),
        "100k metrics": valid_update(task, metrics={f"m{i}": 1.0 for i in range(100_000)}),
    }
    if heavy:
        out["scales bomb 1 GiB"] = on_left(quant_tensor(s0.left, fbits, scales=tensor(
            FLOAT32, [256 << 20], _bomb(1 << 30), compression=DEFLATE)))
    return out


def _rss_under_attack(tmp_path, repeats: int, heavy: bool) -> None:
    from fedmla.coordinator.store import Store
    from fedmla.coordinator.testing import start_coordinator_process
    from fedmla.protos.transport import CoordinatorClient
    store_dir = tmp_path / "store"
    st = Store(store_dir)
    names = ["honest-a", "honest-b", "mallory", "trudy"]
    tokens = {n: st.create_token(n) for n in names}
    st.close()
    args = ["--preset", "tiny", "--clients-per-round", "4", "--min-replies", "2",
            "--round-timeout-s", "120", "--task-long-poll-s", "0", "--log-level", "info"]
    log = tmp_path / "coordinator.log"
    proc, port = start_coordinator_process(store_dir, args, log)
    target = f"127.0.0.1:{port}"
    honest = {n: CoordinatorClient(target, tokens[n], timeout=60) for n in names[:2]}
    raws = {n: RawClient(target, tokens[n]) for n in names[2:]}
    try:
        for c in honest.values():
            c.join(num_examples=10)
        for r in raws.values():
            r.unary("Join", b"")
        tasks = {n: Scene.ready(r) for n, r in raws.items()}
        payloads = {n: SyntheticCodecClient(c, n).update_for(ready_task(c)) for n, c in honest.items()}
        payloads_bad = {n: _hostile_payloads(t, heavy) for n, t in tasks.items()}
        t0 = cpb.GetTaskResponse.FromString(raws["mallory"].unary("GetTask", b"")).task
        base_rss = _proc_kb(proc.pid, "VmRSS")
        base_hwm = _proc_kb(proc.pid, "VmHWM")
        results: dict = {}

        def attack(name):
            for i in range(repeats):
                for what, p in payloads_bad[name].items():
                    results[(name, i, what)] = refusal(lambda: raws[name].submit(
                        submit_chunks(p, t0.round_id, t0.model.version, chunk=1 << 20), timeout=60))
        threads = [threading.Thread(target=attack, args=(n,)) for n in raws]     # two identities at once
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads)
        # garbage to the health service, no token
        anon = RawClient(target, None)
        t_health = time.monotonic()
        health = [refusal(lambda: anon.unary(HEALTH_CHECK, b"\xff\xff\xff\xff"))[0] for _ in range(50)]
        health_windows = 1 + int((time.monotonic() - t_health) / 10)     # one line per 10 s at most
        anon.close()
        hwm = _proc_kb(proc.pid, "VmHWM")
        for r in raws.values():
            r.unary("Leave", b"")
        for n, c in honest.items():
            t = ready_task(c)
            c.submit(payloads[n], t.round_id, t.model.version)
        rounds = wait_for(lambda: [r for r in _read_rounds(store_dir) if r["id"] == t0.round_id], 60, 0.1,
                          "the round to commit")
        grown_mb = (hwm - base_rss) / 1024
        print(f"coordinator RSS before {base_rss / 1024:.0f} MB (peak so far {base_hwm / 1024:.0f} MB), peak during "
              f"the attack {hwm / 1024:.0f} MB: +{grown_mb:.0f} MB; statuses "
              f"{sorted({(w, c.name) for (_, _, w), (c, _) in results.items()})}")
        assert grown_mb < 500, f"hostile uploads raised the coordinator's RSS by {grown_mb:.0f} MB"
        assert all(c in (SC.INVALID_ARGUMENT, SC.RESOURCE_EXHAUSTED) for c, _ in results.values()), results
        assert set(health) == {SC.INVALID_ARGUMENT}, set(health)
        assert rounds[0]["status"] == "committed" and rounds[0]["replied"] == 2, rounds
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
        assert text.count("HealthCheckRequest") <= health_windows, text[-3000:]
    finally:
        for c in honest.values():
            c.close()
        for r in raws.values():
            r.close()
        proc.terminate()
        try:
            proc.wait(20)
        except Exception:
            proc.kill()
            proc.wait(10)


def _read_rounds(store_dir) -> list[dict]:
    import sqlite3
    db = sqlite3.connect(f"file:{store_dir / 'fedmla.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        cur = db.execute("SELECT * FROM rounds ORDER BY id")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def test_hostile_uploads_keep_coordinator_rss_bounded(tmp_path):
    _rss_under_attack(tmp_path, repeats=1, heavy=False)


@pytest.mark.slow
def test_hostile_uploads_keep_coordinator_rss_bounded_full(tmp_path):
    _rss_under_attack(tmp_path, repeats=5, heavy=True)


# ---- downloads nobody reads -----------------------------------------------------------------------
def test_download_streams_in_flight_are_bounded_per_client(scene):
    """A DownloadModel stream the client does not read holds a chunk until its deadline:
    at most two per client; cancelled ones free their place."""
    # a small receive window, so that an unread stream stalls the coordinator's writes
    ch = grpc.insecure_channel(scene.bg.target, options=[("grpc.http2.lookahead_bytes", 1024),
                                                         ("grpc.http2.bdp_probe", 0)])
    call = ch.unary_stream("/fedmla.v1.CoordinatorService/DownloadModel")
    held = [call(b"", metadata=scene.raw.metadata, timeout=30) for _ in range(2)]
    try:
        wait_for(lambda: scene.bg.call(lambda: sum(scene.bg.server.servicer._downloading.values())) == 2, 10, 0.05,
                 "two downloads in flight")
        for _ in range(3):
            code, details = refusal(lambda: list(call(b"", metadata=scene.raw.metadata, timeout=10)))
            _typed(code, details, SC.RESOURCE_EXHAUSTED, "downloads in flight", "third download")
    finally:
        for h in held:
            h.cancel()
    # the cancelled streams free their places; the client downloads normally again
    got = wait_for(lambda: refusal(lambda: list(call(b"", metadata=scene.raw.metadata, timeout=10)))[0] == SC.OK,
                   10, 0.1, "a download after cancelling the held ones")
    assert got
    ch.close()
    rnd, rows = scene.finish()
    assert rnd["status"] == "committed"
