"""Closing a round: finish the streamed aggregate, take the outer step and make the
downlink (:meth:`RoundCloser.aggregate`, on a worker thread), then commit the model, the
codec's state, the downlink and the round's records atomically (:meth:`RoundCloser.close`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedmla.protos.codec import SharedState
from fedmla.protos.fedmla.v1 import types_pb2 as pb

from .bounds import bounded_weights
from .store import ClientRoundRecord, RoundRecord

if TYPE_CHECKING:
    from .rounds import Coordinator, OpenRound

log = logging.getLogger("fedmla.coordinator")


@dataclass
class RoundResult:
    """What a successful aggregation hands to the commit."""

    state: dict[str, torch.Tensor]       # the new global weights (float32)
    importance: list | None              # the round's combined head importance (L x H), if any
    downlink: bytes                      # the serialized downlink every worker applies
    codec_state: dict[str, torch.Tensor]  # the codec's whole state after the round (shared, not copied)
    shared: SharedState                  # the codec's shared state at the new version
    refused: dict[str, str]              # client -> why the aggregator refused its update


class RoundCloser:
    def __init__(self, coord: "Coordinator"):
        self.coord = coord

    async def close(self, rnd: "OpenRound", reason: str) -> None:
        """Aggregate (if enough replied), commit the round atomically, move to the next."""
        co = self.coord
        s = co.settings
        t0 = time.perf_counter()
        ok = len(rnd.replies) >= s.min_replies
        result: RoundResult | None = None
        if ok:
            try:
                result = await asyncio.to_thread(self.aggregate, rnd)
            except Exception as e:  # a faulty aggregator fails the round, not the coordinator
                log.exception("aggregation of round %d failed", rnd.id)
                ok, reason = False, f"aggregation failed: {type(e).__name__}: {e}"
        else:
            reason = f"{reason}: {len(rnd.replies)} replies < min_replies {s.min_replies}"
        agg_s = time.perf_counter() - t0
        if result is not None:      # updates the aggregator refused are rejections, not replies
            for c, why in result.refused.items():
                rnd.replies.pop(c, None)
                rnd.rejected[c] = f"INVALID_ARGUMENT: refused by the defence: {why}"
        records = []
        for c in rnd.sampled:
            if c in rnd.replies:
                r = rnd.replies[c]
                records.append(ClientRoundRecord(c, "replied", r.bytes_up, rnd.bytes_down.get(c, 0),
                                                 r.metrics.get("loss", r.metrics.get("train_loss")), r.num_examples,
                                                 None, r.metrics))
            elif c in rnd.rejected:
                records.append(ClientRoundRecord(c, "rejected", 0, rnd.bytes_down.get(c, 0),
                                                 rejection_reason=rnd.rejected[c]))
            else:
                records.append(ClientRoundRecord(c, "dropped", 0, rnd.bytes_down.get(c, 0)))

        def wmean(key):
            pairs = [(r.metrics[key], r.num_examples) for r in rnd.replies.values() if key in r.metrics]
            n = sum(w for _, w in pairs)
            return sum(v * w for v, w in pairs) / n if n else None
        new_version = co.version + 1 if ok else co.version
        rec = RoundRecord(
            id=rnd.id, status="committed" if ok else "failed", model_version=new_version, base_version=rnd.base_version,
            started_at=rnd.started_at, ended_at=time.time(), sampled=len(rnd.sampled), replied=len(rnd.replies),
            dropped=sum(1 for r in records if r.status == "dropped"), rejected=sum(1 for r in records if r.status == "rejected"),
            train_loss=wmean("loss") if wmean("loss") is not None else wmean("train_loss"), val_loss=wmean("val_loss"),
            bytes_up=sum(r.bytes_up for r in rnd.replies.values()), bytes_down=sum(rnd.bytes_down.values()),
            fedavg_fp32_bytes=len(rnd.replies) * co.spec.num_elements() * 4, aggregation_s=agg_s, reason=reason)
        seen = co.registry.last_seen()
        # The file on a worker thread; the SQLite transaction here, on the loop thread
        # that owns the connection (so no other call can interleave with it).
        # Both files are streamed from the tensors (their hashes read back from the files):
        # no whole-state bytes in memory at the close.
        path = codec_file = sha = None
        if ok:
            path, sha = await asyncio.to_thread(co.store.write_checkpoint_tensors, new_version, result.state)
            codec_file = await asyncio.to_thread(co.store.write_codec_tensors, new_version, result.codec_state)
            result.codec_state = None
        mask = rnd.active_heads.to(torch.int64).tolist()
        meta = None
        if ok and co.accountant is not None:
            co.accountant.record_round(rnd.dp_rate)
            meta = {"privacy": json.dumps(co.privacy_summary())}
        co.store.record_round(rec, records, result.importance if ok else None,
                                (path, sha) if ok else None, seen, s.keep_checkpoints, mask=mask,
                                codec=codec_file, downlink=result.downlink if ok else None,
                                keep_downlinks=s.keep_downlinks, meta=meta)
        if ok:
            co.state, co.model_sha, co.version = result.state, sha, new_version
            co.shared = result.shared
            co.downloads.committed(new_version, result.downlink)
        co.metrics.aggregation_seconds.observe(time.perf_counter() - t0)
        co.metrics.rounds.labels(rec.status).inc()
        co.metrics.model_version.set(co.version)
        shutil.rmtree(co.spool_root / f"round-{rnd.id:06d}", ignore_errors=True)
        co.next_round_id = rnd.id + 1
        co.round = None
        log.info("round %d %s (%s): %d/%d replied, version %d %s", rnd.id, rec.status, reason, rec.replied,
                 rec.sampled, co.version, co.model_sha[:12])
        co._changed.set()

    def make_aggregator(self, rnd: "OpenRound"):
        """The round's aggregator: the codec's exact mean (with the norm-outlier refusal of
        the default defence), a robust defence, or DP-FedAvg; one contract for all."""
        from .defenses import DPAggregator, RobustAggregator
        s, codec = self.coord.settings, self.coord.codec
        if s.dp is not None:
            agg = DPAggregator(codec.shapes, codec.num_layers, codec.num_heads, s.dp,
                               expected_clients=len(rnd.sampled), seed=s.seed)
        else:
            agg = RobustAggregator(codec.shapes, codec.num_layers, codec.num_heads, s.defense,
                                   reload=lambda client: self.reload(rnd, client))
        agg.begin_round(codec.global_state, rnd.plan)
        return agg

    def reload(self, rnd: "OpenRound", client: str):
        """A spooled update of the open round, decoded again (an aggregator taking it out)."""
        return self.coord.ingest.decode(pb.ModelUpdate.FromString(rnd.replies[client].path.read_bytes()), rnd)

    def aggregate(self, rnd: "OpenRound") -> RoundResult:
        """Decode the spooled updates in client-id order into the aggregator, take the outer
        step and produce the downlink (on a worker thread). The codec's state changes only
        if all of it succeeds (on an error it is put back as it was)."""
        co = self.coord
        plan = rnd.plan
        snapshot = co.codec.snapshot()
        try:
            agg = rnd.aggregator             # every accepted update is already in it
            # A client's weight in the mean is at most max_weight_multiple x the round's median
            # count: the few above it are re-weighted (exactly) now that the median is known.
            weights = bounded_weights({c: r.num_examples for c, r in rnd.replies.items()},
                                      co.settings.max_weight_multiple)
            for client in sorted(c for c, w in weights.items() if w != rnd.replies[c].num_examples):
                agg.reweight(client, self.reload(rnd, client), weights[client])
            aggregate = agg.finish()
            importance = agg.importance()
            refused = dict(agg.rejected)
            # No update can arrive any more (the close waited for those being received):
            # the integer sums go now, before the outer step allocates its own tensors.
            rnd.aggregator = agg = None
            if len(rnd.replies) - len(refused) < co.settings.min_replies:
                raise ValueError(f"{len(refused)} update(s) refused by the defence ({'; '.join(refused.values())}), "
                                 f"leaving fewer than min_replies {co.settings.min_replies}")
            down = co.codec.finish_round(plan, aggregate, importance)
            del aggregate
            # finish_round replaces the codec's tensors, never writes into them: the new
            # global weights can be shared, not copied.
            new_state = {k: co.codec.global_state[k].contiguous() for k in co.state}
        except BaseException:
            co.codec.restore(snapshot)
            raise
        return RoundResult(state=new_state, importance=importance.float().tolist() if importance is not None else None,
                           downlink=down.SerializeToString(), codec_state=co.codec.state_dict(copy=False),
                           shared=co.codec.shared, refused=refused)
