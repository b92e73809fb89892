"""The fedmla Flower strategy and ClientApp driven in-process (no Ray): messages built by
the strategy go straight to the ClientApp's handlers with a per-node Context, as the
simulation runtime would deliver them."""

import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.supercore.task_identity import TaskIdentity

from fedmla.protos.weights import model_hash
from fedmla.protos.codec import SharedState, UpdateDecodeError
from fedmla.worker.flower import client_app as ca
from fedmla.worker.flower.config import FlowerConfig, load_federated_data
from fedmla.worker.flower.strategy import FedMLAStrategy
from fedmla.worker.flower.wire import decode_full_state, decode_mask, encode_full_state, encode_mask
from fedmla.worker.trainer import init_global_state

ROOT = Path(__file__).resolve().parents[3]
NODES = [101, 202, 303]


class _Grid:
    """What the strategy asks of a Grid: the connected node ids."""

    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)


@pytest.fixture
def task_identity():
    """Messages need a task identity outside a Flower runtime; restore it afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _small_cfg(**kw) -> FlowerConfig:
    return FlowerConfig(num_nodes=len(NODES), rounds=3, max_bytes_per_client=20_000,
                        trainer={"local_steps": 3, "batch_size": 4, "seq_len": 32, "warmup_steps": 3,
                                 "total_steps": 9}, **kw)


def _contexts():
    return {n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": len(NODES)},
                       state=RecordDict(), run_config={}) for i, n in enumerate(NODES)}


def _round(strategy, grid, ctx, server_round, tamper=None):
    msgs = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
    replies = [ca.train(m, ctx[m.metadata.dst_node_id]) for m in msgs]
    if tamper:
        tamper(replies)
    arrays, _ = strategy.aggregate_train(server_round, replies)
    ev = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
    strategy.aggregate_evaluate(server_round, [ca.evaluate(m, ctx[m.metadata.dst_node_id]) for m in ev])
    return msgs, ev, strategy.rounds[-1]


def test_rounds_keep_every_node_bit_identical_and_resync_a_stale_one(task_identity):
    cfg = _small_cfg()
    strategy = FedMLAStrategy(cfg, init_global_state(cfg.model_cfg(), cfg.seed), min_available_nodes=len(NODES))
    grid, ctx = _Grid(NODES), _contexts()

    msgs, ev, rec = _round(strategy, grid, ctx, 1)
    # Round 1: nodes rebuild the seeded initial model themselves (no weights on the wire).
    assert [m.content["fedmla"]["sync"] for m in msgs] == ["chain"] * 3
    assert all(m.content["fedmla"]["from-hash"] == "seed" for m in msgs)
    assert rec["aggregated"] == 3 and rec["hash_ok"] and not rec["rejected"]
    assert set(rec["client_hashes"].values()) == {strategy.codec.global_hash()}
    assert model_hash(ctx[NODES[0]].state["fedmla.global"].to_torch_state_dict()) == strategy.codec.global_hash()
    fp32 = strategy.fp32_model_bytes
    assert max(rec["up_bytes"].values()) < fp32 / 5 and max(rec["down_bytes"].values()) < fp32 / 5
    assert set(ctx[NODES[1]].state.array_records) >= {"fedmla.global", "fedmla.shared", "fedmla.residual"}

    # Node 202's copy drifts by one ulp-sized nudge: it must notice and ask for a resync.
    st = ctx[202].state["fedmla.global"].to_torch_state_dict()
    name = sorted(st)[0]
    st[name] = st[name] + 1e-4
    ctx[202].state["fedmla.global"] = ArrayRecord(torch_state_dict=st)
    msgs, ev, rec = _round(strategy, grid, ctx, 2)
    assert [m.content["fedmla"]["sync"] for m in msgs] == ["none"] * 3   # all up to date, as far as we knew
    assert rec["aggregated"] == 2 and "202" in rec["rejected"] and "resync" in rec["rejected"]["202"]
    # The evaluate phase of the same round delivers the full model to 202 (the others get the downlink).
    sync = {m.metadata.dst_node_id: m.content["fedmla"]["sync"] for m in ev}
    assert sync == {101: "chain", 202: "full", 303: "chain"}
    assert rec["down_bytes"]["202"] > fp32 > 5 * rec["down_bytes"]["101"]
    assert rec["hash_ok"] and set(rec["client_hashes"].values()) == {strategy.codec.global_hash()}

    msgs, ev, rec = _round(strategy, grid, ctx, 3)
    assert [m.content["fedmla"]["sync"] for m in msgs] == ["none"] * 3
    assert rec["aggregated"] == 3 and rec["hash_ok"] and not rec["rejected"]
    for n in NODES:
        assert model_hash(ctx[n].state["fedmla.global"].to_torch_state_dict()) == strategy.codec.global_hash()


def test_a_malformed_update_is_rejected_and_changes_nothing_else(task_identity):
    cfg = _small_cfg()
    strategy = FedMLAStrategy(cfg, init_global_state(cfg.model_cfg(), cfg.seed), min_available_nodes=len(NODES))
    grid, ctx = _Grid(NODES), _contexts()

    def tamper(replies):
        body = replies[0].content["fedmla"]
        body["update"] = bytes(body["update"])[:-7]     # truncated protobuf

    _, _, rec = _round(strategy, grid, ctx, 1, tamper)
    assert rec["aggregated"] == 2 and str(NODES[0]) in rec["rejected"]
    assert rec["rejected"][str(NODES[0])].startswith("bad update")
    assert rec["hash_ok"]


def test_sampling_a_subset_sends_late_joiners_the_downlink_chain(task_identity):
    cfg = _small_cfg(clients_per_round=1)
    strategy = FedMLAStrategy(cfg, init_global_state(cfg.model_cfg(), cfg.seed), min_available_nodes=len(NODES))
    grid, ctx = _Grid(NODES), _contexts()
    seen = []
    for r in (1, 2, 3):
        msgs, ev, rec = _round(strategy, grid, ctx, r)
        assert len(msgs) == 1 and rec["hash_ok"]
        node = msgs[0].metadata.dst_node_id
        body = msgs[0].content["fedmla"]
        if node not in seen:     # a node seen for the first time replays every downlink from the seed
            assert body["sync"] == "chain" and body["from-hash"] == "seed"
            assert len(body.get("downlinks", [])) == r - 1
        seen.append(node)


def test_wire_helpers_roundtrip_and_validate():
    cfg = FlowerConfig()
    mc = cfg.model_cfg()
    mask = torch.zeros(mc.n_layers, mc.n_heads, dtype=torch.bool)
    mask[0, [0, 2]] = True
    mask[1, 3] = True
    assert torch.equal(decode_mask(encode_mask(mask), mc.n_layers, mc.n_heads), mask)
    with pytest.raises(UpdateDecodeError):
        decode_mask(encode_mask(mask)[:1], mc.n_layers, mc.n_heads)
    state = init_global_state(mc, 3)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    got, shared = decode_full_state(encode_full_state(state, SharedState(round=5)), shapes)
    assert model_hash(got) == model_hash(state) and shared.round == 5
    bad = dict(shapes)
    name = sorted(bad)[0]
    bad[name] = (1,) + tuple(bad[name])
    with pytest.raises(UpdateDecodeError):
        decode_full_state(encode_full_state(state, SharedState(round=0)), bad)


def test_pyproject_declares_the_flower_app_and_its_defaults_parse():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert conf["components"] == {"serverapp": "fedmla.worker.flower.server_app:app",
                                  "clientapp": "fedmla.worker.flower.client_app:app"}
    cfg = FlowerConfig.from_run_config(conf["config"])
    assert cfg.strategy == "fedmla" and cfg.rounds in (2, 3) and cfg.preset == "tiny"
    assert cfg.clients_per_round is None and cfg.data_dir is None
    assert cfg.trainer.total_steps == cfg.rounds * cfg.trainer.local_steps
    over = FlowerConfig.from_run_config({**conf["config"], "strategy": "fedavg", "codec": '{"rank": 4}',
                                         "num-server-rounds": 3})
    assert over.strategy == "fedavg" and over.codec.rank == 4 and over.trainer.total_steps == 3 * over.trainer.local_steps
    with pytest.raises(ValueError):
        FlowerConfig.from_run_config({"no-such-key": 1})
    from fedmla.worker.flower.client_app import app as client
    from fedmla.worker.flower.server_app import app as server
    assert isinstance(client, ClientApp) and isinstance(server, ServerApp)


def test_more_nodes_than_folder_clients_are_repartitioned(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.txt").write_text(("hello federated world %s\n" % name) * 400)
    cfg = FlowerConfig(data_dir=str(tmp_path), trainer={"seq_len": 32})
    data = load_federated_data(cfg, 3)
    assert len(data.clients) == 3 and data.validation.size(0) > 0


def test_config_from_the_comm_benchmark_uses_the_same_data_and_model():
    from fedmla.worker.apps.bench_comm import load_data, quick_config
    bench = quick_config()
    cfg = FlowerConfig.from_bench(bench)
    assert cfg.strategy == "fedavg" and cfg.num_nodes == bench.num_clients and cfg.rounds == bench.rounds
    assert cfg.trainer == bench.trainer and cfg.codec == bench.codec
    assert cfg.model_cfg() == FlowerConfig(preset=bench.preset, model_overrides=bench.model_overrides).model_cfg()
    assert load_federated_data(cfg, cfg.num_nodes).fingerprint() == load_data(bench, None).fingerprint()


def test_a_run_not_started_from_the_seed_sends_new_nodes_the_full_model(task_identity):
    cfg = _small_cfg()
    start = init_global_state(cfg.model_cfg(), cfg.seed + 1)       # e.g. a checkpoint
    strategy = FedMLAStrategy(cfg, start, min_available_nodes=len(NODES))
    grid, ctx = _Grid(NODES), _contexts()
    msgs, _, rec = _round(strategy, grid, ctx, 1)
    assert [m.content["fedmla"]["sync"] for m in msgs] == ["full"] * 3
    assert rec["aggregated"] == 3 and rec["hash_ok"]
