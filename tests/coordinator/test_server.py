"""A real coordinator on 127.0.0.1:0: rounds, refusals with typed statuses, auth."""

import grpc
import pytest
import torch

from fedmla.coordinator.synthetic import synthetic_update
from fedmla.protos.weights import sha256_hex
from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import encode_tensor
from fedmla.protos.transport import CoordinatorClient, apply_download

from fedmla.coordinator.testing import make_clients, ready_task, wait_for


def spec(bg):
    return bg.coord.spec


def update_for(bg, task, seed=0, **kw):
    mask = torch.tensor(list(task.active_heads.active)).reshape(task.active_heads.num_layers,
                                                                task.active_heads.num_heads)
    return synthetic_update(spec(bg), rank=4, seed=seed, active_heads=mask, **kw)


def code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_full_round_with_several_clients(coordinator):
    bg = coordinator
    clients = make_clients(bg, ["alice", "bob", "carol"])
    v0 = clients[0].get_task().model
    for i, c in enumerate(clients):
        task = ready_task(c)
        assert task.round_id == 1 and task.model.version == 0 and task.codec.max_rank == bg.settings.max_rank
        state, version = c.download_state()
        assert version.sha256 == v0.sha256 == sha256_hex(bg.coord.model_bytes)
        r = c.submit(update_for(bg, task, seed=i), task.round_id, task.model.version)
        assert r.round_id == 1 and r.replies_in_round == i + 1
    wait_for(lambda: clients[0].get_task().model.version == 1, what="round 1 commit")
    rounds = bg.call(lambda: bg.store.rounds())
    assert [(r["id"], r["status"], r["replied"], r["sampled"]) for r in rounds] == [(1, "committed", 3, 3)]
    rows = bg.call(lambda: bg.store.client_rounds(1))
    assert [(r["client"], r["status"]) for r in rows] == [("alice", "replied"), ("bob", "replied"), ("carol", "replied")]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
    # the new model differs from the old and a delta download reproduces it bit for bit
    state1, ver1 = clients[0].download_state(state, 0)
    assert ver1.version == 1 and ver1.sha256 != v0.sha256
    full = clients[1].download()
    assert apply_download(full).keys() == state1.keys()
    assert all(torch.equal(state1[k], apply_download(full)[k]) for k in state1)


@pytest.mark.coord(clients_per_round=4, min_replies=2, max_update_bytes=64 << 10, rank=4, max_rank=4)
def test_bad_payloads_refused_with_status_while_round_completes(coordinator):
    bg = coordinator
    good1, good2, bad, other = make_clients(bg, ["g1", "g2", "bad", "zz"])
    tasks = {c: ready_task(c) for c in (good1, good2, bad, other)}
    t = tasks[bad]
    rid, ver = t.round_id, t.model.version

    def with_(mutate):
        m = update_for(bg, t, seed=5)
        mutate(m)
        return m

    def set_name(m):
        m.factors[0].name = "layers.0.attn.bogus.weight"

    def nan(m):
        m.dense[0].value.CopyFrom(encode_tensor(torch.full(tuple(m.dense[0].value.shape), float("nan"))))

    def high_rank(m):
        f = next(f for f in m.factors if f.name == "layers.0.ffn.w1.weight")
        rows, cols = spec(bg).shapes[f.name]
        f.rank = 6
        f.left.CopyFrom(encode_tensor(torch.zeros(rows, 6)))
        f.right.CopyFrom(encode_tensor(torch.zeros(6, cols)))

    def f64(m):
        m.dense[0].value.CopyFrom(encode_tensor(torch.zeros(tuple(m.dense[0].value.shape), dtype=torch.float64)))

    def wrong_shape(m):
        m.dense[0].value.CopyFrom(encode_tensor(torch.zeros(7)))

    cases = {
        "unknown name": (lambda: bad.submit(with_(set_name), rid, ver), grpc.StatusCode.INVALID_ARGUMENT),
        "non-finite": (lambda: bad.submit(with_(nan), rid, ver), grpc.StatusCode.INVALID_ARGUMENT),
        "rank": (lambda: bad.submit(with_(high_rank), rid, ver), grpc.StatusCode.INVALID_ARGUMENT),
        "dtype": (lambda: bad.submit(with_(f64), rid, ver), grpc.StatusCode.INVALID_ARGUMENT),
        "shape": (lambda: bad.submit(with_(wrong_shape), rid, ver), grpc.StatusCode.INVALID_ARGUMENT),
        "garbage bytes": (lambda: bad.submit(b"\xff\x01garbage" * 10, rid, ver), grpc.StatusCode.INVALID_ARGUMENT),
        "late round": (lambda: bad.submit(update_for(bg, t), rid - 1 if rid > 1 else rid + 5, ver),
                       grpc.StatusCode.FAILED_PRECONDITION),
        "stale version": (lambda: bad.submit(update_for(bg, t), rid, ver + 3), grpc.StatusCode.FAILED_PRECONDITION),
        "too big": (lambda: bad.submit(b"\x00" * (65 << 10), rid, ver), grpc.StatusCode.RESOURCE_EXHAUSTED),
    }
    messages = {}
    for what, (call, want) in cases.items():
        code, details = code_of(call)
        assert code == want, (what, code, details)
        messages[what] = details
    # each message names the thing at fault
    assert "layers.0.attn.bogus.weight" in messages["unknown name"]
    assert "NaN" in messages["non-finite"]
    assert "rank 6 outside [1, max_rank=4]" in messages["rank"]
    assert "FLOAT64" in messages["dtype"]
    assert "shape" in messages["shape"] and "ModelUpdate" in messages["garbage bytes"]
    assert "replayed" in messages["late round"] and "version" in messages["stale version"]
    assert "exceeds" in messages["too big"]
    assert bg.call(lambda: len(bg.coord.round.replies)) == 0   # nothing changed
    # a corrupted upload: the header's hash does not match the bytes
    payload = update_for(bg, t).SerializeToString()
    from fedmla.protos.transport import submit_requests
    reqs = list(submit_requests(payload, rid, ver, chunk_bytes=4096))
    reqs[1].data = b"x" * len(reqs[1].data)
    code, details = code_of(lambda: bad.stub.SubmitUpdate(iter(reqs), metadata=bad._metadata))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "SHA-256" in details
    # the good clients complete the round; a replay is refused
    good1.submit(update_for(bg, t, seed=1), rid, ver)
    code, _ = code_of(lambda: good1.submit(update_for(bg, t, seed=1), rid, ver))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    good2.submit(update_for(bg, t, seed=2), rid, ver)
    # a rejected client may retry until the round closes; these two give up instead, so the
    # round closes without waiting for its deadline
    bad.leave("giving up")
    other.leave("test")
    wait_for(lambda: good1.get_task().model.version == 1, what="commit with the good clients")
    rows = {r["client"]: r for r in bg.call(lambda: bg.store.client_rounds(rid))}
    assert rows["g1"]["status"] == rows["g2"]["status"] == "replied"
    assert rows["bad"]["status"] == "rejected" and "SHA-256" in rows["bad"]["rejection_reason"]
    assert rows["zz"]["status"] == "dropped"
    r = bg.call(lambda: bg.store.rounds())[0]
    assert (r["replied"], r["rejected"], r["dropped"]) == (2, 1, 1)
    # the late update for the closed round is refused by round id
    code, details = code_of(lambda: good2.submit(update_for(bg, t, seed=2), rid, ver))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and str(rid) in details
    text = bg.call(lambda: __import__("prometheus_client").generate_latest(bg.server.metrics.registry).decode())
    assert 'fedmla_rejections_total{reason="non_finite"}' in text and 'fedmla_rounds_total{status="committed"} 1.0' in text


def test_rank_within_limit_but_above_max_is_refused_by_validation_message(tmp_path):
    # rank above the task's max_rank names both numbers
    from fedmla.coordinator.errors import InvalidArgument
    from fedmla.coordinator.validation import ModelSpec, UpdateLimits, decode_update
    from fedmla.mla_model import MLAConfig
    s = ModelSpec.from_config(MLAConfig.preset("tiny"))
    m = synthetic_update(s, rank=8)
    with pytest.raises(InvalidArgument, match=r"rank 8 outside \[1, max_rank=4\]"):
        decode_update(m, s, UpdateLimits(max_rank=4, max_update_bytes=1 << 20))


def test_wrong_missing_and_revoked_tokens_refused(coordinator):
    bg = coordinator
    (alice,) = make_clients(bg, ["alice"])
    assert alice.get_task().status in (cpb.GetTaskResponse.WAIT, cpb.GetTaskResponse.READY)
    token = bg.call(lambda: bg.store.create_token("mallory"))
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for bad_token in (forged, "fm1.0000000000000000.secret", "not-a-token", ""):
        c = CoordinatorClient(bg.target, bad_token)
        code, details = code_of(lambda: c.join(num_examples=1))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "token" in details
        c.close()
    m = CoordinatorClient(bg.target, token)
    m.join(num_examples=1)
    bg.call(lambda: bg.store.revoke_tokens("mallory"))
    code, details = code_of(lambda: m.get_task())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details
    assert alice.health() == 1  # SERVING; health needs no token


def test_not_joined_and_not_sampled(coordinator):
    bg = coordinator
    (ghost,) = make_clients(bg, ["ghost"], join=False)
    code, details = code_of(lambda: ghost.get_task())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "Join" in details
    assert ghost.heartbeat().action == cpb.HeartbeatResponse.REJOIN


@pytest.mark.coord(clients_per_round=2, min_replies=2, round_timeout_s=1.0)
def test_deadline_with_too_few_replies_fails_round_and_keeps_model(coordinator):
    bg = coordinator
    a, b = make_clients(bg, ["a", "b"])
    t = ready_task(a)
    a.submit(update_for(bg, t), t.round_id, t.model.version)
    b.heartbeat(t.round_id, "training")
    wait_for(lambda: bg.call(lambda: bg.coord.next_round_id) >= 2, what="round 1 deadline")
    r = bg.call(lambda: bg.store.rounds())[0]
    assert r["status"] == "failed" and "min_replies" in r["reason"] and r["model_version"] == 0
    # the next round has a new id and the same model; the stale update is refused
    t2 = ready_task(a)
    assert t2.round_id == 2 and t2.model.version == 0
    assert b.heartbeat(t.round_id).action == cpb.HeartbeatResponse.NEW_TASK
    code, _ = code_of(lambda: b.submit(update_for(bg, t), t.round_id, t.model.version))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.coord(clients_per_round=2, min_replies=1, keep_ratio=0.5, rounds=2)
def test_head_mask_follows_importance_and_run_finishes(coordinator):
    bg = coordinator
    a, b = make_clients(bg, ["a", "b"])
    for _ in range(2):
        for c in (a, b):
            t = ready_task(c)
            m = update_for(bg, t)
            L, H = t.active_heads.num_layers, t.active_heads.num_heads
            scores = torch.zeros(L, H)
            scores[:, 1] = 1.0
            scores[:, 3] = 0.5
            m.importance.CopyFrom(pb.HeadScores(num_layers=L, num_heads=H, scores=scores.flatten().tolist()))
            c.submit(m, t.round_id, t.model.version)
        wait_for(lambda: a.get_task().status != cpb.GetTaskResponse.SUBMITTED, what="next round")
    wait_for(lambda: a.get_task().status == cpb.GetTaskResponse.FINISHED, what="the run to finish")
    # round 2's mask: the two most important heads (1 and 3) of every layer
    assert t.round_id == 2
    assert list(t.active_heads.active) == [False, True, False, True] * L


@pytest.mark.coord(clients_per_round=1, min_replies=1)
def test_client_not_sampled_waits_and_cannot_submit(coordinator):
    bg = coordinator
    a, b = make_clients(bg, ["a", "b"])
    sampled = wait_for(lambda: bg.call(lambda: bg.coord.round and list(bg.coord.round.sampled)), what="round open")
    chosen, idle = (a, b) if sampled == ["a"] else (b, a)
    t = ready_task(chosen)
    assert idle.get_task().status == cpb.GetTaskResponse.WAIT
    code, details = code_of(lambda: idle.submit(update_for(bg, t), t.round_id, t.model.version))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not sampled" in details


@pytest.mark.coord(clients_per_round=2, min_replies=1, client_timeout_s=1.0, round_timeout_s=120)
def test_silent_client_is_a_dropout_and_round_closes_before_deadline(coordinator):
    bg = coordinator
    a, b = make_clients(bg, ["a", "b"])
    t = ready_task(a)
    a.submit(update_for(bg, t), t.round_id, t.model.version)
    # b never calls again: after client_timeout_s it is a dropout and the round commits
    wait_for(lambda: a.heartbeat().current_round >= 2 or None, what="round 1 to close", timeout=30)
    r = bg.call(lambda: bg.store.rounds())[0]
    assert (r["status"], r["replied"], r["dropped"]) == ("committed", 1, 1)
    assert "dropped" in r["reason"]


class ExplodingAggregator:
    def begin_round(self, global_state, task):
        pass

    def add(self, client_id, update, num_examples):
        raise RuntimeError("codec bug")

    def finish(self):
        return {}


def test_failing_aggregator_fails_the_round_not_the_service(tmp_path):
    from fedmla.coordinator.inprocess import BackgroundCoordinator
    from fedmla.coordinator.testing import settings_for
    with BackgroundCoordinator(settings_for(tmp_path, clients_per_round=1, min_replies=1),
                               aggregator=ExplodingAggregator()) as bg:
        (a,) = make_clients(bg, ["a"])
        t = ready_task(a)
        a.submit(update_for(bg, t), t.round_id, t.model.version)
        t2 = ready_task(a)
        assert (t2.round_id, t2.model.version) == (2, 0)
        r = bg.call(lambda: bg.store.rounds())[0]
        assert r["status"] == "failed" and "codec bug" in r["reason"]
