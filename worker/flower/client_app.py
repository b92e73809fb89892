"""The Flower ClientApp: fedmla's local trainer and worker-side codec on a Flower node.

Two kinds of train messages, told apart by their records:

- fedmla (a ``fedmla`` ConfigRecord): bring the node's copy of the global weights up to
  date from what the message carries (nothing, a chain of downlink ``ModelUpdate`` bytes,
  or a full fp32 state), check its SHA-256 against the coordinator's, train with
  :class:`~worker.trainer.LocalTrainer`, encode the pseudo-gradient with
  :class:`~coordinator.codec.ClientCodec` and reply with the serialized ``ModelUpdate``.
  The global copy, the codec's shared state and the error-feedback residual live in
  ``context.state`` (Flower recreates app objects between messages; the context persists
  per node).
- Flower's FedAvg (an ``arrays`` ArrayRecord): train from those weights and reply with
  the new weights, the FedAvg baseline on the same trainer and data.

A node whose reconstruction does not hash to the coordinator's replies ``status=resync``
with no update; the strategy then sends it the full model next time.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmla.protos.weights import model_hash
from fedmla.protos.codec import (ClientCodec, RoundPlan, SharedState, TensorCodec, UpdateDecodeError,
                               apply_downlink)
from fedmla.protos.fedmla.v1 import types_pb2 as pb

from ..data import ClientData
from ..trainer import LocalTrainer, init_global_state
from .config import FlowerConfig, load_federated_data
from .wire import decode_full_state, decode_mask

FEDMLA_KEY = "fedmla"          # ConfigRecord of a fedmla message (both directions)
RUN_KEY = "run"                # FlowerConfig JSON inside the config record
_GLOBAL, _SHARED, _RESIDUAL = "fedmla.global", "fedmla.shared", "fedmla.residual"

app = ClientApp()


class _Node:
    """Everything one message needs: config, model config, trainer and this node's data."""

    def __init__(self, cfg: FlowerConfig, context: Context):
        self.cfg = cfg
        torch.set_num_threads(cfg.torch_threads)
        self.model_cfg = cfg.model_cfg()
        self.trainer = LocalTrainer(self.model_cfg, cfg.trainer)
        pid = int(context.node_config["partition-id"])
        num = int(context.node_config["num-partitions"])
        self.data: ClientData = load_federated_data(cfg, num).clients[pid]
        self.state = context.state


# ---- node state in context.state -----------------------------------------------------------------

def _load_global(state: RecordDict) -> tuple[dict[str, torch.Tensor], SharedState, str] | None:
    if _GLOBAL not in state.array_records:
        return None
    glob = state.array_records[_GLOBAL].to_torch_state_dict()
    shared = SharedState.from_tensors(state.array_records[_SHARED].to_torch_state_dict())
    # The hash is recomputed from the stored tensors, never trusted from a label.
    return glob, shared, model_hash(glob)


def _save_global(state: RecordDict, glob: dict[str, torch.Tensor], shared: SharedState) -> None:
    state[_GLOBAL] = ArrayRecord(torch_state_dict={n: t.contiguous() for n, t in glob.items()})
    state[_SHARED] = ArrayRecord(torch_state_dict=shared.to_tensors())


def synchronise(node: _Node, rec: ConfigRecord) -> tuple[dict[str, torch.Tensor], SharedState, str]:
    """The node's global weights and shared state after applying what ``rec`` carries.

    Returns (global, shared, hash); the caller compares the hash with ``rec['global-hash']``.
    Raises UpdateDecodeError when the message cannot be applied (then the node asks for a resync).
    """
    cfg, model_cfg = node.cfg, node.model_cfg
    shapes = {n: tuple(t.shape) for n, t in node.trainer.model.state_dict().items()}
    sync = str(rec["sync"])
    held = _load_global(node.state)
    if sync == "full":
        glob, shared = decode_full_state(bytes(rec["full"]), shapes)
        return glob, shared, model_hash(glob)
    if sync == "none":
        if held is None:
            raise UpdateDecodeError("told to keep a global model this node does not hold")
        return held
    if sync != "chain":
        raise UpdateDecodeError(f"unknown sync kind {sync!r}")
    start = str(rec["from-hash"])
    if start == "seed":
        glob = init_global_state(model_cfg, cfg.seed)
        shared = SharedState.initial(shapes, cfg.codec)
    elif held is not None and held[2] == start:
        glob, shared, _ = held
    else:
        raise UpdateDecodeError("downlink chain starts from a global model this node does not hold")
    tensors = TensorCodec(model_cfg, cfg.codec, shapes)
    for raw in rec.get("downlinks", []):
        glob, shared = apply_downlink(glob, shared, pb.ModelUpdate.FromString(bytes(raw)), tensors)
    return glob, shared, model_hash(glob)


def _resync_reply(msg: Message, held_hash: str, reason: str) -> Message:
    return Message(RecordDict({FEDMLA_KEY: ConfigRecord({"status": "resync", "hash": held_hash,
                                                         "reason": reason[:500]})}), reply_to=msg)


# ---- fedmla ----------------------------------------------------------------------------------------

def _synchronised(msg: Message, context: Context):
    """Bring this node's global copy up to the server's; (rec, node, glob, shared, hash) or a resync reply."""
    rec = msg.content.config_records[FEDMLA_KEY]
    node = _Node(FlowerConfig.from_json(str(rec[RUN_KEY])), context)
    try:
        glob, shared, h = synchronise(node, rec)
    except UpdateDecodeError as e:
        return _resync_reply(msg, "", str(e))
    if h != rec["global-hash"]:
        return _resync_reply(msg, h, "reconstructed global weights hash differently")
    _save_global(node.state, glob, shared)
    return rec, node, glob, shared, h


def _fedmla_train(msg: Message, context: Context) -> Message:
    synced = _synchronised(msg, context)
    if isinstance(synced, Message):
        return synced
    rec, node, glob, shared, h = synced
    rnd = int(rec["round"])
    if shared.round != rnd:
        return _resync_reply(msg, h, f"shared state is at round {shared.round}, the plan at {rnd}")
    mc = node.model_cfg
    plan = RoundPlan(round=rnd, mask=decode_mask(list(rec["mask"]), mc.n_layers, mc.n_heads), shared=shared,
                     send_dense=rnd % node.cfg.codec.dense_every == 0)
    res = node.trainer.train(glob, node.data, round_idx=rnd)
    codec = ClientCodec(mc, node.cfg.codec, {n: tuple(t.shape) for n, t in glob.items()}, node.data.name)
    if _RESIDUAL in node.state.array_records:
        codec.load_state_dict(node.state.array_records[_RESIDUAL].to_torch_state_dict())
    update = codec.encode(glob, res.state, plan, res.importance, res.num_examples,
                          {"train_loss": res.metrics["train_loss"]})
    node.state[_RESIDUAL] = ArrayRecord(torch_state_dict=codec.state_dict())
    reply = RecordDict({
        FEDMLA_KEY: ConfigRecord({"status": "ok", "hash": h, "round": rnd, "client": node.data.name,
                                  "update": update.SerializeToString()}),
        "metrics": MetricRecord({"num-examples": res.num_examples, "train_loss": res.metrics["train_loss"]}),
    })
    return Message(reply, reply_to=msg)


def _local_eval_windows(node: _Node) -> torch.Tensor | None:
    """The first ``client_eval_windows`` non-overlapping windows of the node's held-out tail."""
    span = node.cfg.trainer.seq_len + 1
    k = min(node.cfg.client_eval_windows, node.data.eval.numel() // span)
    if k <= 0:
        return None
    return node.data.eval[: k * span].view(k, span).long()


def _fedmla_evaluate(msg: Message, context: Context) -> Message:
    synced = _synchronised(msg, context)
    if isinstance(synced, Message):
        return synced
    rec, node, glob, shared, h = synced
    metrics = MetricRecord({"num-examples": 1})
    windows = _local_eval_windows(node)
    if windows is not None:
        metrics = MetricRecord({"num-examples": int(windows.size(0)),
                                "eval_loss": node.trainer.evaluate(glob, windows)["loss"]})
    return Message(RecordDict({FEDMLA_KEY: ConfigRecord({"status": "ok", "hash": h, "client": node.data.name}),
                               "metrics": metrics}), reply_to=msg)


# ---- Flower FedAvg baseline ------------------------------------------------------------------------

def _fedavg_train(msg: Message, context: Context) -> Message:
    conf = msg.content.config_records["config"]
    node = _Node(FlowerConfig.from_json(str(conf[RUN_KEY])), context)
    glob = msg.content.array_records["arrays"].to_torch_state_dict()
    rnd = int(conf["server-round"]) - 1
    res = node.trainer.train(glob, node.data, round_idx=rnd)
    reply = RecordDict({"arrays": ArrayRecord(torch_state_dict=res.state),
                        "metrics": MetricRecord({"num-examples": res.num_examples,
                                                 "train_loss": res.metrics["train_loss"]})})
    return Message(reply, reply_to=msg)


def _fedavg_evaluate(msg: Message, context: Context) -> Message:
    conf = msg.content.config_records["config"]
    node = _Node(FlowerConfig.from_json(str(conf[RUN_KEY])), context)
    windows = _local_eval_windows(node)
    metrics = {"num-examples": 1}
    if windows is not None:
        glob = msg.content.array_records["arrays"].to_torch_state_dict()
        metrics = {"num-examples": int(windows.size(0)), "eval_loss": node.trainer.evaluate(glob, windows)["loss"]}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if FEDMLA_KEY in msg.content.config_records:
        return _fedmla_train(msg, context)
    return _fedavg_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if FEDMLA_KEY in msg.content.config_records:
        return _fedmla_evaluate(msg, context)
    return _fedavg_evaluate(msg, context)
