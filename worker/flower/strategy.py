"""Flower strategies: ``FedMLAStrategy`` (fedmla's codec and exact aggregation behind
Flower's Strategy interface) and ``CountingFedAvg`` (Flower's own FedAvg, unchanged, with
the bytes it sends counted for the baseline).

FedMLAStrategy, one round (``Strategy.start`` drives it)::

    configure_train     plan = codec.plan(); each sampled node gets the plan (round, the
                        active-head mask as HeadSelection bytes) and whatever brings its copy
                        of the global weights to the coordinator's: nothing, the chain of
                        downlink ModelUpdate bytes since the version it holds (from the seed
                        for a new node), or the full fp32 model when that is cheaper or its
                        hash was stale;
    aggregate_train     decode each reply's ModelUpdate (validated against the plan), add it to
                        the codec's ExactAggregator keyed by zero-padded node id (so the sum
                        runs in sorted node order), outer step, next downlink;
    configure_evaluate  delivers that downlink to the evaluation nodes, which check their
                        reconstruction's SHA-256 against the coordinator's and evaluate on
                        their held-out tail; the per-round ``hash_ok`` comes from there.

Bytes per node and round are the lengths of the serialized protobuf payloads the records
carry (update, downlinks or full model, mask), next to the fp32 FedAvg message size.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log
from google.protobuf.message import DecodeError

from fedmla.protos.weights import model_hash
from fedmla.protos.codec import ServerCodec, UpdateDecodeError
from fedmla.protos.fedmla.v1 import types_pb2 as pb

from ..trainer import init_global_state
from .client_app import FEDMLA_KEY, RUN_KEY
from .config import FlowerConfig
from .wire import dense_message, encode_full_state, encode_mask

_STALE = "stale"   # a node whose reconstruction hashed differently: send it the full model


def _client_key(node_id: int) -> str:
    return f"{int(node_id):020d}"


class FedMLAStrategy(Strategy):
    """fedmla's coordinator as a Flower strategy. Holds a :class:`ServerCodec`."""

    def __init__(self, cfg: FlowerConfig, init_state, min_available_nodes: int = 1):
        self.cfg = cfg
        self.model_cfg = cfg.model_cfg()
        self.codec = ServerCodec(self.model_cfg, cfg.codec, init_state)
        self.min_available_nodes = min_available_nodes
        self.fp32_model_bytes = dense_message(self.codec.global_state).ByteSize()
        self.full_bytes = len(encode_full_state(self.codec.global_state, self.codec.shared))
        self.node_hash: dict[int, str] = {}                 # what each node holds, as far as we know
        self.history: list[tuple[str, bytes]] = []          # (hash before, downlink bytes) per codec round
        self.rounds: list[dict] = []                        # per server round: bytes, losses, hashes
        self._plan = None
        self._rec: dict | None = None
        self._run_json = cfg.to_json()
        # A node without a model rebuilds it from the seed only if that is where we started.
        self._seeded = self.codec.global_hash() == model_hash(init_global_state(self.model_cfg, cfg.seed))

    def summary(self) -> None:
        c = self.cfg.codec
        log(INFO, "\t├──> fedmla codec: %s rank %d, factors int%d, downlink int%d, head selection %s, outer %s",
            c.method, c.rank, c.factor_bits, c.downlink_bits, c.head_selection, c.outer)
        log(INFO, "\t└──> nodes per round: %s; fp32 model message %d B", self.cfg.clients_per_round or "all",
            self.fp32_model_bytes)

    # ---- what brings a node to the current global ------------------------------------------------
    def _sync_record(self, node_id: int) -> tuple[dict, int]:
        """(record fields, payload bytes) that bring ``node_id`` to the coordinator's global."""
        target = self.codec.global_hash()
        held = self.node_hash.get(node_id)
        if held == target:
            return {"sync": "none"}, 0
        starts = {h: i for i, (h, _) in enumerate(self.history)}
        start = None
        if held is None and self._seeded:
            start, origin = 0, "seed"
        elif held in starts:
            start, origin = starts[held], held
        if start is not None:
            chain = [raw for _, raw in self.history[start:]]
            size = sum(len(raw) for raw in chain)
            if size < self.full_bytes:
                rec = {"sync": "chain", "from-hash": origin}
                if chain:
                    rec["downlinks"] = chain
                return rec, size
        full = encode_full_state(self.codec.global_state, self.codec.shared)
        return {"sync": "full", "full": full}, len(full)

    def _messages(self, node_ids: list[int], message_type: str, server_round: int, extra: dict,
                  extra_bytes: int = 0) -> list[Message]:
        msgs = []
        for node in node_ids:
            sync, size = self._sync_record(node)
            rec = ConfigRecord({RUN_KEY: self._run_json, "server-round": server_round,
                                "global-hash": self.codec.global_hash(), **sync, **extra})
            msgs.append(Message(RecordDict({FEDMLA_KEY: rec}), message_type=message_type, dst_node_id=node))
            down = self._rec["down_bytes"]
            down[str(node)] = down.get(str(node), 0) + size + extra_bytes
        return msgs

    def _sample(self, grid: Grid, server_round: int) -> list[int]:
        k = self.cfg.clients_per_round
        _, all_nodes = sample_nodes(grid, max(self.min_available_nodes, k or 1), 0)
        nodes = sorted(all_nodes)
        if k is None or k >= len(nodes):
            return nodes
        return sorted(random.Random(f"{self.cfg.seed}/sample/{server_round}").sample(nodes, k))

    # ---- Strategy interface ----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self._plan = plan = self.codec.plan()
        mask = encode_mask(plan.mask)
        nodes = self._sample(grid, server_round)
        self._rec = {"round": server_round, "codec_round": plan.round, "nodes": nodes, "up_bytes": {},
                     "down_bytes": {}, "active_heads": int(plan.mask.sum()), "rejected": {}}
        log(INFO, "configure_train: round %d (codec round %d), %d nodes", server_round, plan.round, len(nodes))
        return self._messages(nodes, MessageType.TRAIN, server_round, {"round": plan.round, "mask": mask},
                              extra_bytes=sum(len(m) for m in mask))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        plan, rec = self._plan, self._rec
        target = self.codec.global_hash()
        agg = self.codec.aggregator(plan)
        losses = []
        for reply in sorted(replies, key=lambda m: m.metadata.src_node_id):
            node = reply.metadata.src_node_id
            if reply.has_error():
                rec["rejected"][str(node)] = f"error: {reply.error.reason}"
                continue
            body = reply.content.config_records.get(FEDMLA_KEY)
            if body is None:
                rec["rejected"][str(node)] = "reply without a fedmla record"
                continue
            if body["status"] != "ok":
                self.node_hash[node] = _STALE
                rec["rejected"][str(node)] = f"resync: {body.get('reason', '')}"
                continue
            self.node_hash[node] = str(body["hash"])
            if body["hash"] != target:
                rec["rejected"][str(node)] = "trained from another global model"
                continue
            raw = bytes(body["update"])
            rec["up_bytes"][str(node)] = len(raw)
            try:
                decoded = self.codec.decode(pb.ModelUpdate.FromString(raw), plan)
            except (UpdateDecodeError, DecodeError) as e:
                rec["rejected"][str(node)] = f"bad update: {e}"
                continue
            agg.add(_client_key(node), decoded)
            losses.append((decoded.num_examples, decoded.metrics.get("train_loss", float("nan"))))
        for node, why in rec["rejected"].items():
            log(WARNING, "node %s: %s", node, why)
        rec["aggregated"] = agg.num_clients
        rec["fedavg_fp32_bytes"] = 2 * self.fp32_model_bytes * len(rec["nodes"])
        if agg.num_clients == 0:
            rec["global_hash"] = target
            self.rounds.append(rec)
            return None, None
        down = self.codec.finish_round(plan, agg.finish(), agg.importance())
        self.history.append((target, down.SerializeToString()))
        rec["downlink_bytes"] = len(self.history[-1][1])
        rec["global_hash"] = self.codec.global_hash()
        n = sum(k for k, _ in losses)
        rec["train_loss"] = sum(k * v for k, v in losses) / n
        self.rounds.append(rec)
        metrics = MetricRecord({"train_loss": rec["train_loss"], "num-nodes": agg.num_clients,
                                "up_bytes": sum(rec["up_bytes"].values())})
        return ArrayRecord(torch_state_dict=self.codec.global_state), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        if not self.rounds:
            return []
        return self._messages(self.rounds[-1]["nodes"], MessageType.EVALUATE, server_round, {})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rec = self.rounds[-1]
        target = self.codec.global_hash()
        hashes, losses = {}, []
        for reply in sorted(replies, key=lambda m: m.metadata.src_node_id):
            node = reply.metadata.src_node_id
            if reply.has_error():
                rec["rejected"][f"eval {node}"] = f"error: {reply.error.reason}"
                continue
            body = reply.content.config_records.get(FEDMLA_KEY)
            if body is None:
                rec["rejected"][f"eval {node}"] = "reply without a fedmla record"
                continue
            self.node_hash[node] = str(body["hash"]) if body["status"] == "ok" else _STALE
            hashes[str(node)] = str(body["hash"])
            m = reply.content.metric_records.get("metrics", {})
            if "eval_loss" in m:
                losses.append((int(m["num-examples"]), float(m["eval_loss"])))
        if not hashes:
            return None
        rec["client_hashes"] = hashes
        rec["hash_ok"] = bool(hashes) and all(h == target for h in hashes.values())
        if not rec["hash_ok"]:
            log(WARNING, "round %d: some nodes reconstructed a different global model", server_round)
        out = {"hash_ok": int(rec["hash_ok"])}
        if losses:
            n = sum(k for k, _ in losses)
            rec["client_eval_loss"] = out["eval_loss"] = sum(k * v for k, v in losses) / n
        return MetricRecord(out)


class CountingFedAvg(FedAvg):
    """Flower's own FedAvg (sampling, weighted averaging untouched); records the bytes of the
    ArrayRecords it sends and receives per node and round (``ArrayRecord.count_bytes``)."""

    def __init__(self, fp32_model_bytes: int, **kwargs):
        super().__init__(**kwargs)
        self.fp32_model_bytes = fp32_model_bytes
        self.rounds: list[dict] = []

    def configure_train(self, server_round, arrays, config, grid):
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self.rounds.append({"round": server_round, "nodes": sorted(m.metadata.dst_node_id for m in msgs),
                            "down_bytes": {str(m.metadata.dst_node_id):
                                           m.content.array_records[self.arrayrecord_key].count_bytes()
                                           for m in msgs}, "up_bytes": {}})
        return msgs

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        rec = self.rounds[-1]
        for r in replies:
            if not r.has_error() and self.arrayrecord_key in r.content.array_records:
                rec["up_bytes"][str(r.metadata.src_node_id)] = r.content.array_records[self.arrayrecord_key].count_bytes()
        rec["fedavg_fp32_bytes"] = 2 * self.fp32_model_bytes * len(rec["nodes"])
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None and "train_loss" in metrics:
            rec["train_loss"] = float(metrics["train_loss"])
        return arrays, metrics
