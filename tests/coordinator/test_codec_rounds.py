"""The coordinator in its default codec mode, over real gRPC on loopback.

Clients are :class:`coordinator.synthetic.SyntheticCodecClient`: real downloads (full
state, downlink chains), real ClientCodec encodings, no training.
"""

import json
import sqlite3

import grpc
import pytest
import torch

from fedmla.protos.codec import CodecConfig, ServerCodec
from fedmla.coordinator.errors import StoreError
from fedmla.coordinator.inprocess import BackgroundCoordinator
from fedmla.coordinator.rounds import Coordinator
from fedmla.coordinator.store import Store
from fedmla.coordinator.synthetic import SyntheticCodecClient
from fedmla.coordinator.testing import make_clients, ready_task, settings_for, wait_for
from fedmla.protos.weights import load_safetensors_bytes, model_hash
from fedmla.protos.fedmla.v1 import coordinator_pb2 as cpb
from fedmla.protos.fedmla.v1 import types_pb2 as pb

NAMES = ["alice", "bob"]


def codec_settings(tmp_path, **kw):
    base = dict(clients_per_round=2, min_replies=2, codec=CodecConfig(keep_ratio=0.5, rank=4))
    base.update(kw)
    return settings_for(tmp_path, **base)


def run_rounds(bg, synth, n):
    """Every client answers every task until version n is committed; the last task seen."""
    done, last = set(), None
    while True:
        for name, s in synth.items():
            if bg.call(lambda: bg.coord.version) >= n:
                return last
            r = s.client.get_task()
            if (r.status == cpb.GetTaskResponse.READY and (name, r.task.round_id) not in done
                    and r.task.model.version < n):       # never answer a round beyond version n
                s.client.submit(s.update_for(r.task), r.task.round_id, r.task.model.version)
                done.add((name, r.task.round_id))
                last = r.task


def test_codec_rounds_downloads_store_and_hashes(tmp_path):
    with BackgroundCoordinator(codec_settings(tmp_path, rounds=3)) as bg:
        clients = make_clients(bg, NAMES)
        synth = {n: SyntheticCodecClient(c, n) for n, c in zip(NAMES, clients)}
        task = ready_task(clients[0])
        cfg = CodecConfig.model_validate_json(task.codec.config_json)
        assert cfg == bg.settings.codec and task.codec.rank == 4 and task.codec.keep_ratio == 0.5
        last = run_rounds(bg, synth, 3)
        coord = bg.coord
        finished = wait_for(lambda: (r := clients[0].get_task()).status == cpb.GetTaskResponse.FINISHED and r,
                            what="FINISHED")
        assert finished.model.version == 3
        # Every client ends on the coordinator's bits: first a full state, then chains of downlinks.
        for s in synth.values():
            s.sync(last, finished.model)
            assert model_hash(s.state) == coord.model_sha and s.shared.digest() == coord.shared.digest()
            assert s.downloads[0] == cpb.DownloadModelResponse.CODEC_FULL
            assert set(s.downloads[1:]) == {cpb.DownloadModelResponse.CODEC_CHAIN}
        # A client three versions behind gets a chain of three downlinks, smaller than the full state.
        chain_dl = clients[0].download(0)
        full_dl = clients[0].download()
        assert chain_dl.kind == cpb.DownloadModelResponse.CODEC_CHAIN and full_dl.kind == cpb.DownloadModelResponse.CODEC_FULL
        chain = cpb.CodecDownlinks.FromString(chain_dl.data)
        assert chain.base_version == 0 and len(chain.downlinks) == 3
        assert len(chain_dl.data) < len(full_dl.data) / 3
        # Uplink bytes: the serialized updates, far below a dense fp32 delta.
        rounds = bg.call(lambda: coord.store.rounds())
        fp32 = coord.spec.num_elements() * 4
        for r in rounds:
            assert r["status"] == "committed" and r["replied"] == 2
            assert r["bytes_up"] < r["fedavg_fp32_bytes"] / 10
            rows = bg.call(lambda r=r: coord.store.client_rounds(r["id"]))
            assert sum(c["bytes_up"] for c in rows) == r["bytes_up"]
        assert rounds[0]["fedavg_fp32_bytes"] == 2 * fp32
        # Store: mask and importance per round, codec state beside the checkpoint, downlinks kept.
        db = sqlite3.connect(coord.store.db_path)
        masks = [json.loads(m) for (m,) in db.execute("SELECT mask FROM head_importance ORDER BY round_id")]
        assert len(masks) == 3
        L, H = coord.spec.num_layers, coord.spec.num_heads
        for i, m in enumerate(masks):
            assert len(m) == L and all(len(row) == H for row in m)
            # No importance before round 1: every head; then the top half plus one exploration head.
            assert all(sum(row) == (H if i == 0 else H // 2 + 1) for row in m), (i, m)
        assert [v for (v,) in db.execute("SELECT version FROM downlinks ORDER BY version")] == [1, 2, 3]
        rec = coord.store.latest_model()
        state = load_safetensors_bytes(coord.store.read_codec_state(rec))
        assert model_hash({k[len("global/"):]: v for k, v in state.items() if k.startswith("global/")}) == rec.sha256
        db.close()


def test_bad_codec_updates_refused_and_state_unchanged(tmp_path):
    with BackgroundCoordinator(codec_settings(tmp_path)) as bg:
        clients = make_clients(bg, NAMES)
        synth = {n: SyntheticCodecClient(c, n) for n, c in zip(NAMES, clients)}
        run_rounds(bg, synth, 1)      # round 1 has every head active; round 2 selects by importance
        task = ready_task(clients[0])
        assert task.round_id == 2 and not all(task.active_heads.active)
        good = pb.ModelUpdate.FromString(synth["alice"].update_for(task))
        inactive = [h for h in range(task.active_heads.num_heads) if not task.active_heads.active[h]]

        def variant(edit):
            m = pb.ModelUpdate()
            m.CopyFrom(good)
            edit(m)
            return m

        def heads_sent(m):
            f = next(f for f in m.factors if f.HasField("heads"))
            f.heads.heads[0] = inactive[0]

        def nan_factor(m):
            t = m.factors[0].right
            target = t.quant.scales if t.HasField("quant") and t.quant.scheme != pb.Quantization.SCHEME_NONE else t
            target.data = b"\x00\x00\xc0\x7f" * (len(target.data) // 4)

        def bad_importance(m):
            m.importance.scores[0] = -1.0

        def extra_rank(m):
            f = m.factors[0]
            f.rank = f.rank + 1

        cases = {"inactive head": heads_sent, "NaN": nan_factor, "negative importance": bad_importance,
                 "rank": extra_rank, "unknown key": lambda m: setattr(m.factors[0], "name", "layers.9.nope.weight"),
                 "no examples": lambda m: setattr(m, "num_examples", 0)}
        before = bg.call(lambda: (bg.coord.codec.global_hash(), bg.coord.codec.shared.digest()))
        for what, edit in cases.items():
            with pytest.raises(grpc.RpcError) as e:
                clients[0].submit(variant(edit), task.round_id, task.model.version)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, e.value.details())
            assert "codec plan" in e.value.details(), (what, e.value.details())
        assert bg.call(lambda: (bg.coord.codec.global_hash(), bg.coord.codec.shared.digest())) == before
        assert "alice" not in bg.call(lambda: set(bg.coord.round.replies))
        # The good one is still accepted afterwards.
        clients[0].submit(good, task.round_id, task.model.version)
        assert "alice" in bg.call(lambda: set(bg.coord.round.replies))


def test_restart_continues_codec_state_and_refuses_changed_codec(tmp_path):
    settings = codec_settings(tmp_path, rounds=2)
    with BackgroundCoordinator(settings) as bg:
        clients = make_clients(bg, NAMES)
        synth = {n: SyntheticCodecClient(c, n) for n, c in zip(NAMES, clients)}
        run_rounds(bg, synth, 2)
        saved = bg.call(lambda: (bg.coord.codec.state_dict(), bg.coord.shared.digest(), bg.coord.model_sha))
        for c in clients:
            c.close()
    again = Coordinator(settings)
    try:
        state = again.codec.state_dict()
        assert set(state) == set(saved[0])
        assert all(torch.equal(state[k], saved[0][k]) for k in state)
        assert again.shared.digest() == saved[1] and again.model_sha == saved[2] and again.version == 2
        assert "importance" in state and "shared/momentum/embed.weight" in state   # EMA and the replicated momentum
        # The next plan is the one the uninterrupted coordinator would make, not a fresh codec's.
        fresh = ServerCodec(again.cfg, settings.codec, again.state)
        fresh.load_state_dict(saved[0])
        assert again.codec.plan().mask.equal(fresh.plan().mask)
    finally:
        again.store.close()
    changed = settings.model_copy(update={"codec": CodecConfig(keep_ratio=0.5, rank=8)})
    with pytest.raises(StoreError, match=r"codec config.*\['rank'\]"):
        Coordinator(changed)


def test_version_one_store_is_migrated(tmp_path):
    """A store written by schema version 1 (no codec columns, mask or downlinks) opens,
    is migrated in one step and keeps its rows."""
    from fedmla.coordinator.dashboard.sqlite_source import STORE_SCHEMA   # the version-1 layout, as the dashboard documents it
    root = tmp_path / "old"
    root.mkdir()
    db = sqlite3.connect(root / "fedmla.sqlite")
    db.executescript(STORE_SCHEMA)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("app", "fedmla-coordinator"), ("schema_version", "1"),
                                                     ("run_id", "r1"), ("created_at", "0")])
    db.execute("INSERT INTO head_importance VALUES (1, 1, 2, '[[0.5, 0.5]]')")
    db.commit()
    db.close()
    st = Store(root)
    assert st.meta("schema_version") == "2" and st.run_id == "r1"
    cols = {r[1] for r in st.db.execute("PRAGMA table_info(head_importance)")}
    assert "mask" in cols
    assert st.db.execute("SELECT scores, mask FROM head_importance").fetchall() == [("[[0.5, 0.5]]", None)]
    assert st.downlinks(0, 0) == []
    st.close()
    assert Store(root).meta("schema_version") == "2"     # idempotent


def test_get_task_long_poll_wakes_the_sampled_client_and_respects_deadlines(tmp_path):
    """An idle client's GetTask is held (not answered WAIT at once) and returns READY as
    soon as a round samples it; the hold never outlasts the caller's deadline."""
    import threading
    import time

    from fedmla.protos.transport import CoordinatorClient
    settings = codec_settings(tmp_path, clients_per_round=2, min_replies=2, task_long_poll_s=20.0)
    with BackgroundCoordinator(settings) as bg:
        tokens = {n: bg.call(lambda n=n: bg.store.create_token(n)) for n in ("alice", "bob")}
        # Alone, no round can open. With a 3 s deadline of its own the caller gets WAIT
        # before it (held about deadline - 1 s), not DEADLINE_EXCEEDED.
        with CoordinatorClient(bg.target, tokens["alice"], timeout=3) as short:
            short.join(num_examples=10)
            t0 = time.monotonic()
            r = short.get_task()
            held = time.monotonic() - t0
        assert r.status == cpb.GetTaskResponse.WAIT and 1.5 <= held < 3, held
        alice = CoordinatorClient(bg.target, tokens["alice"], timeout=30)
        out = {}

        def poll():
            t0 = time.monotonic()
            out["reply"] = alice.get_task()
            out["held"] = time.monotonic() - t0
        t = threading.Thread(target=poll)
        t.start()
        time.sleep(1.0)
        assert t.is_alive(), "GetTask answered WAIT at once instead of holding"
        with CoordinatorClient(bg.target, tokens["bob"], timeout=30) as bob:
            bob.join(num_examples=10)                 # the second client lets round 1 open
            t.join(15)
            assert not t.is_alive()
        assert out["reply"].status == cpb.GetTaskResponse.READY and out["reply"].task.round_id == 1
        assert out["held"] >= 0.9
        alice.close()


def test_get_task_hold_ends_well_inside_the_client_timeout(tmp_path):
    """Virtual clients send no heartbeat while their GetTask is held, so the hold is at most
    half client_timeout_s (and the caller's deadline): a held client never looks silent."""
    settings = codec_settings(tmp_path, task_long_poll_s=20.0, client_timeout_s=6.0)
    with BackgroundCoordinator(settings) as bg:
        assert bg.coord.hold_s() == 3.0 and bg.coord.hold_s(1.5) == 1.5
    settings = codec_settings(tmp_path / "b", task_long_poll_s=20.0, client_timeout_s=120.0)
    with BackgroundCoordinator(settings) as bg:
        assert bg.coord.hold_s() == 20.0 and bg.coord.hold_s(30.0) == 20.0


def test_bench_coordinator_codec_path_small_run():
    """`fedmla bench coordinator` drives real codec updates through a coordinator process."""
    from fedmla.coordinator.bench import run_bench
    out = run_bench(clients=3, preset="tiny", rounds=2, codec='{"rank": 4, "factor_bits": 4}', distinct_updates=2)
    assert out["updates"] == 6
    assert out["round_status"] == ["committed", "committed"]
    assert 0 < out["update_bytes_mean"] < 100_000      # compressed: the tiny model is ~390 KB in fp32
    dense = run_bench(clients=2, preset="tiny", rounds=1, codec="fedavg", distinct_updates=1)
    assert dense["round_status"] == ["committed"]
    assert dense["update_bytes_mean"] > 300_000        # the fedavg preset sends every tensor in fp32


def test_dp_budget_stops_the_run_before_the_round_that_would_exceed_it(tmp_path):
    from fedmla.coordinator.privacy import DPConfig, PrivacyAccountant
    probe = PrivacyAccountant(DPConfig(noise_multiplier=1.0, target_epsilon=1e9))
    eps = [probe.record_round(1.0) for _ in range(3)]            # two of two clients per round: q = 1
    target = (eps[1] + eps[2]) / 2                                # room for two rounds, not three
    dp = DPConfig(clip_norm=1.0, noise_multiplier=1.0, target_epsilon=target)
    with BackgroundCoordinator(codec_settings(tmp_path, dp=dp, dashboard_port=0)) as bg:
        clients = make_clients(bg, NAMES)
        synth = {n: SyntheticCodecClient(c, n) for n, c in zip(NAMES, clients)}
        run_rounds(bg, synth, 2)
        finished = wait_for(lambda: (r := clients[0].get_task()).status == cpb.GetTaskResponse.FINISHED and r,
                            what="the run to end at the budget")
        assert finished.model.version == 2 and bg.call(lambda: bg.coord.version) == 2
        assert "privacy budget" in bg.call(lambda: bg.coord.stop_reason)
        saved = json.loads(bg.call(lambda: bg.store.meta("privacy")))
        assert saved["rounds"] == 2 and saved["exhausted"] is True
        assert saved["epsilon"] == pytest.approx(eps[1], rel=1e-9) and saved["epsilon"] <= target
        import httpx
        run = httpx.get(bg.server.dashboard.url + "api/run", timeout=10).json()
        assert run["privacy"]["epsilon"] == pytest.approx(eps[1], rel=1e-9) and run["privacy"]["exhausted"]
    # A restarted coordinator keeps the spent budget: it refuses at once.
    again = Coordinator(codec_settings(tmp_path, dp=dp))
    try:
        assert again.accountant.rounds == 2 and again.accountant.epsilon() == pytest.approx(eps[1], rel=1e-9)
    finally:
        again.store.close()


def test_defence_refuses_a_huge_update_and_the_round_commits_without_it(tmp_path):
    from fedmla.coordinator.defenses import DefenseConfig
    names = ["a", "b", "c", "evil"]
    settings = codec_settings(tmp_path, clients_per_round=4, min_replies=3, defense=DefenseConfig(kind="median"))
    with BackgroundCoordinator(settings) as bg:
        clients = make_clients(bg, names)
        synth = {n: SyntheticCodecClient(c, n) for n, c in zip(names, clients)}
        synth["evil"].scale = 1e5          # norm about 1e7 x the honest ones
        run_rounds(bg, synth, 1)
        rows = {r["client"]: r for r in bg.call(lambda: bg.store.client_rounds(1))}
        assert rows["evil"]["status"] == "rejected" and "refused by the defence" in rows["evil"]["rejection_reason"]
        assert {c for c, r in rows.items() if r["status"] == "replied"} == {"a", "b", "c"}
        rnd = bg.call(lambda: bg.store.rounds())[0]
        assert rnd["status"] == "committed" and rnd["replied"] == 3 and rnd["rejected"] == 1


@pytest.mark.parametrize("downlink", ["svd", "topk"])
def test_topk_codec_rounds_over_grpc(tmp_path, downlink):
    """method 'topk' through the coordinator: uploads bounded and decoded by the plan,
    aggregated, sent down (low-rank or top-k); every client ends on the coordinator's bits."""
    codec = CodecConfig(method="topk", topk_chunk=512, topk_k=16, keep_ratio=0.5, topk_downlink=downlink)
    with BackgroundCoordinator(codec_settings(tmp_path, rounds=2, codec=codec)) as bg:
        clients = make_clients(bg, NAMES)
        synth = {n: SyntheticCodecClient(c, n) for n, c in zip(NAMES, clients)}
        task = ready_task(clients[0])
        assert CodecConfig.model_validate_json(task.codec.config_json) == codec
        last = run_rounds(bg, synth, 2)
        finished = wait_for(lambda: (r := clients[0].get_task()).status == cpb.GetTaskResponse.FINISHED and r,
                            what="FINISHED")
        for s in synth.values():
            s.sync(last, finished.model)
            assert model_hash(s.state) == bg.coord.model_sha
        rounds = bg.call(lambda: bg.coord.store.rounds())
        assert [r["status"] for r in rounds] == ["committed", "committed"] and all(r["replied"] == 2 for r in rounds)
        assert all(r["bytes_up"] < r["fedavg_fp32_bytes"] / 10 for r in rounds)
        chain = cpb.CodecDownlinks.FromString(clients[0].download(0).data)
        down = pb.ModelUpdate.FromString(chain.downlinks[0])
        assert any(d.HasField("sparse") for d in down.dense) == (downlink == "topk")
