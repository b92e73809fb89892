"""A real coordinator on 127.0.0.1:0: rounds, refusals with typed statuses, auth."""

import grpc
import pytest
import torch

from fedmla.coordinator.registry import sample_round
from fedmla.coordinator.synthetic import synthetic_update

from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.tensors import encode_tensor
from fedmla.protos.transport import CoordinatorClient

from fedmla.coordinator.testing import download_global, make_clients, ready_task, wait_for


def spec(bg):
    return bg.coord.spec


def update_for(bg, task, seed=0, **kw):
    return synthetic_update(task, seed=seed, **kw)


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
        assert task.round_id == 1 and task.model.version == 0 and task.codec.max_rank == bg.settings.codec.max_rank
        state, shared, version = download_global(c, task.model_config_json)
        assert version.sha256 == v0.sha256 == bg.coord.model_sha
        r = c.submit(update_for(bg, task, seed=i), task.round_id, task.model.version)
        assert r.round_id == 1 and r.replies_in_round == i + 1
    wait_for(lambda: clients[0].get_task().model.version == 1, what="round 1 commit")
    rounds = bg.call(lambda: bg.store.rounds())
    assert [(r["id"], r["status"], r["replied"], r["sampled"]) for r in rounds] == [(1, "committed", 3, 3)]
    rows = bg.call(lambda: bg.store.client_rounds(1))
    assert [(r["client"], r["status"]) for r in rows] == [("alice", "replied"), ("bob", "replied"), ("carol", "replied")]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
    # the new model differs from the old; a chain download from version 0 reproduces it bit for bit
    state1, shared1, ver1 = download_global(clients[1], task.model_config_json)
    assert ver1.version == 1 and ver1.sha256 != v0.sha256
    from fedmla.mla_model import MLAConfig
    from fedmla.protos.codec import CodecConfig
    from fedmla.protos.codec.transfer import apply_chain
    from fedmla.protos.codec.wire import TensorCodec
    chain = clients[0].download(0)
    assert chain.kind == cpb.DownloadModelResponse.CODEC_CHAIN
    tensors = TensorCodec(MLAConfig.model_validate_json(task.model_config_json),
                          CodecConfig.model_validate_json(task.codec.config_json), {n: tuple(v.shape) for n, v in state.items()})
    replayed, _ = apply_chain(state, shared, list(cpb.CodecDownlinks.FromString(chain.data).downlinks), tensors)
    assert all(torch.equal(state1[k], replayed[k]) for k in state1)


@pytest.mark.coord(clients_per_round=4, min_replies=2, max_update_bytes=64 << 10,
                   codec=__import__("fedmla.protos.codec", fromlist=["CodecConfig"]).CodecConfig(rank=4))
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
        s = m.dense[0].value.quant.scales
        s.CopyFrom(encode_tensor(torch.full(tuple(s.shape), float("nan")).to(torch.float16)))

    def high_rank(m):
        f = next(f for f in m.factors if f.name == "layers.0.ffn.w1.weight")
        f.rank = 6

    def f64(m):
        s = m.dense[0].value.quant.scales
        s.CopyFrom(encode_tensor(torch.zeros(tuple(s.shape), dtype=torch.float64)))

    def wrong_shape(m):
        m.dense[0].value.shape[:] = [7]

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
    assert "non-finite" in messages["non-finite"] and "layers.0.attn.kv_norm.weight" in messages["non-finite"]
    assert "layers.0.ffn.w1.weight: rank 6, expected 4" in messages["rank"]
    assert "FLOAT64" in messages["dtype"] and ".scales" in messages["dtype"]
    assert "shape [7]" in messages["shape"] and "ModelUpdate" in messages["garbage bytes"]
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
    assert 'fedmla_rejections_total{reason="invalid_update"}' in text and 'fedmla_rounds_total{status="committed"} 1.0' in text


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


@pytest.mark.coord(clients_per_round=2, min_replies=2, round_timeout_s=3.0)
def test_deadline_with_too_few_replies_fails_round_and_keeps_model(coordinator):
    bg = coordinator
    a, b = make_clients(bg, ["a", "b"])
    t = ready_task(a)
    m = update_for(bg, t)
    try:
        a.submit(m, t.round_id, t.model.version)
    except grpc.RpcError as e:    # the encoding outlived the short deadline: round 1 failed all the same
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
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


@pytest.mark.coord(clients_per_round=2, min_replies=1, rounds=2,
                   codec=__import__("fedmla.protos.codec", fromlist=["CodecConfig"]).CodecConfig(keep_ratio=0.5, explore_heads=0))
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


@pytest.mark.coord(clients_per_round=2, min_clients=5, seed=7)
def test_round_samples_the_seeded_draw_of_the_active_clients(coordinator):
    """The first round, opened once all five have joined, samples what sample_round (the
    function simulate calls to place its clients ahead of the run) draws from them."""
    bg = coordinator
    names = ["e", "c", "a", "d", "b"]
    make_clients(bg, names)
    sampled, rid = wait_for(lambda: bg.call(lambda: bg.coord.round and (list(bg.coord.round.sampled),
                                                                        bg.coord.round.id)), what="round open")
    assert sampled == sample_round(7, rid, sorted(names), 2)


@pytest.mark.coord(clients_per_round=2, min_replies=1, client_timeout_s=8.0, round_timeout_s=120)
def test_silent_client_is_a_dropout_and_round_closes_before_deadline(coordinator):
    bg = coordinator
    a, b = make_clients(bg, ["a", "b"])
    t = ready_task(a)
    a.submit(update_for(bg, t), t.round_id, t.model.version)   # encoding takes well under client_timeout_s
    # b never calls again: after client_timeout_s it is a dropout and the round commits
    wait_for(lambda: a.heartbeat().current_round > t.round_id or None, what="the round to close", timeout=30)
    r = next(r for r in bg.call(lambda: bg.store.rounds()) if r["id"] == t.round_id)
    assert (r["status"], r["replied"], r["dropped"]) == ("committed", 1, 1)
    assert "dropped" in r["reason"]


def test_failing_aggregation_fails_the_round_not_the_service(tmp_path):
    from fedmla.coordinator.inprocess import BackgroundCoordinator
    from fedmla.coordinator.testing import settings_for

    def boom(*args, **kwargs):
        raise RuntimeError("codec bug")

    with BackgroundCoordinator(settings_for(tmp_path, clients_per_round=1, min_replies=1)) as bg:
        before = bg.call(lambda: bg.coord.codec.global_hash())
        bg.call(lambda: setattr(bg.coord.codec, "finish_round", boom))
        (a,) = make_clients(bg, ["a"])
        t = ready_task(a)
        a.submit(update_for(bg, t), t.round_id, t.model.version)
        t2 = ready_task(a)
        assert (t2.round_id, t2.model.version) == (2, 0)
        r = bg.call(lambda: bg.store.rounds())[0]
        assert r["status"] == "failed" and "codec bug" in r["reason"]
        assert bg.call(lambda: bg.coord.codec.global_hash()) == before == t2.model.sha256
