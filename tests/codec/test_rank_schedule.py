"""Per-tensor-class and per-round ranks (ffn_rank, embed_rank and their downlink twins, early_rounds with
early_rank / early_downlink_rank): what is sent, what the receiver accepts, the size bound,
and the downlink chain a catching-up worker replays."""

import pytest
import torch
from pydantic import ValidationError

from fedmla.mla_model import MLAConfig, init_global_state
from fedmla.protos.codec import ClientCodec, CodecConfig, ServerCodec, UpdateDecodeError
from fedmla.protos.codec.catchup import apply_catchup, catchup_payload, plan_catchup
from fedmla.protos.codec.config import is_ffn_tensor
from fedmla.protos.codec.server import _downlink_plan
from fedmla.protos.fedmla.v1 import types_pb2 as pb
from fedmla.protos.weights import model_hash

MODEL = MLAConfig.preset("tiny")          # dim 64, FFN 128: every rank below 64 is kept as asked
SEED = 5
SCHEDULE = CodecConfig(rank=4, ffn_rank=7, ffn_downlink_rank=3, embed_rank=5, embed_downlink_rank=2, early_rounds=1,
                       early_rank=9, early_downlink_rank=6)


@pytest.fixture(scope="module")
def state():
    return init_global_state(MODEL, SEED)


def _local(state, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: t + 1e-2 * torch.randn(t.shape, generator=g) for n, t in state.items()}


def _class(name, ffn, embed, other):
    return ffn if is_ffn_tensor(name) else embed if name == "embed.weight" else other


def test_rank_for_hand_cases():
    c = SCHEDULE
    ffn, attn = "layers.1.ffn.w2.weight", "layers.0.attn.wkv_b.weight"
    assert is_ffn_tensor(ffn) and not is_ffn_tensor(attn) and not is_ffn_tensor("embed.weight")
    assert [c.rank_for("embed.weight", r, u) for r in (0, 1) for u in (True, False)] == [9, 6, 5, 2]
    assert c.rank_for("lm_head.weight", 1, True) == 5
    assert [c.rank_for(ffn, 0, True), c.rank_for(attn, 0, True), c.rank_for(ffn, 0, False), c.rank_for(attn, 0, False)] \
        == [9, 9, 6, 6]                                         # round 0: the early ranks, every class
    assert [c.rank_for(ffn, 1, True), c.rank_for(attn, 1, True), c.rank_for(ffn, 1, False), c.rank_for(attn, 1, False)] \
        == [7, 4, 3, 4]
    only_up = CodecConfig(rank=4, downlink_rank=5, early_rounds=2, early_rank=8)
    assert [only_up.rank_for(attn, r, False) for r in (0, 1, 2)] == [5, 5, 5]
    assert [only_up.rank_for(attn, r, True) for r in (0, 1, 2)] == [8, 8, 4]
    assert c.max_rank == 9 and CodecConfig().max_rank == 12


@pytest.mark.parametrize("kw, match", [
    ({"early_rounds": 2}, "early_rounds and early_rank"),
    ({"early_rank": 16}, "early_rounds and early_rank"),
    ({"ffn_rank": 0}, "greater than or equal to 1"),
    ({"method": "powersgd", "ffn_rank": 16}, "ffn_rank must be unset"),
    ({"method": "powersgd", "early_rounds": 1, "early_downlink_rank": 16}, "early_downlink_rank must be unset"),
])
def test_bad_schedules_are_refused_readably(kw, match):
    with pytest.raises(ValidationError, match=match):
        CodecConfig(**kw)


def test_factors_take_the_scheduled_ranks_both_ways_and_round_trip(state):
    server = ServerCodec(MODEL, SCHEDULE, state)
    client = ClientCodec(MODEL, SCHEDULE, server.shapes, "a")
    held, held_shared = dict(state), server.shared
    chain, hashes = [], [server.global_hash()]
    for r, (up, dn) in enumerate([((9, 9, 9), (6, 6, 6)), ((7, 5, 4), (3, 2, 4)), ((7, 5, 4), (3, 2, 4))]):
        plan = server.plan()
        msg = client.encode(held, _local(held, r), plan, None, 10)
        ranks = {f.name: f.rank for f in msg.factors}
        assert ranks and all(k == _class(n, *up) for n, k in ranks.items()), (r, ranks)
        assert len(msg.SerializeToString()) <= server.max_update_bytes(plan)
        dec = server.decode(pb.ModelUpdate.FromString(msg.SerializeToString()), plan)
        assert {n: p.left.size(0) for n, p in dec.tensors.parts.items() if p.left is not None} == ranks
        agg = server.aggregator(plan)
        agg.add("a", dec)
        down = server.finish_round(plan, agg.finish(), agg.importance())
        down_ranks = {f.name: f.rank for f in down.factors}
        assert down_ranks and all(k == _class(n, *dn) for n, k in down_ranks.items())
        chain.append(down.SerializeToString())
        hashes.append(server.global_hash())
        # the sampled worker keeps up by the same downlink; its hash must be the coordinator's
        cp = plan_catchup(r, r + 1, [len(b) for b in chain], 10 ** 9)
        held, held_shared = apply_catchup(cp, catchup_payload(cp, chain, None), held, held_shared, MODEL, SCHEDULE,
                                          SEED, hashes[-1])
    # a worker that held nothing replays the whole chain (early-rank downlink first) from the seed
    cp = plan_catchup(None, 3, [len(b) for b in chain], 10 ** 9)
    st, sh = apply_catchup(cp, catchup_payload(cp, chain, None), None, None, MODEL, SCHEDULE, SEED, hashes[3])
    assert model_hash(st) == server.global_hash() and sh.digest() == server.shared.digest()


def test_an_update_with_the_wrong_rounds_rank_is_refused(state):
    """Round 0's early rank is refused in round 1 (and the bound shrinks with the rank)."""
    server = ServerCodec(MODEL, SCHEDULE, state)
    plan0 = server.plan()
    early = ClientCodec(MODEL, SCHEDULE, server.shapes, "a").encode(state, _local(state, 1), plan0, None, 10)
    bound0 = server.max_update_bytes(plan0)
    agg = server.aggregator(plan0)
    agg.add("a", server.decode(early, plan0))
    server.finish_round(plan0, agg.finish(), agg.importance())
    plan1 = server.plan()
    assert server.max_update_bytes(plan1) < bound0
    stale = pb.ModelUpdate()
    stale.CopyFrom(early)
    with pytest.raises(UpdateDecodeError, match=r"embed\.weight: rank 9, expected 5"):
        server.decode(stale, plan1)
    # an FFN factor grown past ffn_rank (one more row in both factors) is refused by its rank
    ok = ClientCodec(MODEL, SCHEDULE, server.shapes, "b").encode(server.global_state, _local(server.global_state, 2),
                                                                 plan1, None, 10)
    bigger = ClientCodec(MODEL, SCHEDULE.model_copy(update={"ffn_rank": 8}), server.shapes, "b").encode(
        server.global_state, _local(server.global_state, 2), plan1, None, 10)
    server.decode(ok, plan1)
    assert len(bigger.SerializeToString()) > len(ok.SerializeToString())
    with pytest.raises(UpdateDecodeError, match=r"ffn\.w\d\.weight: rank 8, expected 7"):
        server.decode(bigger, plan1)
    # a factor whose declared rank is right but whose rows are the larger rank's is refused by its shape
    forged = pb.ModelUpdate()
    forged.CopyFrom(bigger)
    for f in forged.factors:
        if is_ffn_tensor(f.name):
            f.rank = 7
    with pytest.raises(UpdateDecodeError, match=r"ffn\.w\d\.weight\.left: .*(shape|elements)"):
        server.decode(forged, plan1)


def test_downlink_decoder_holds_the_downlink_schedule(state):
    server = ServerCodec(MODEL, SCHEDULE, state)
    plan = server.plan()
    shared0 = server.shared
    down = server.finish_round(plan, {n: 1e-2 * torch.ones(s) for n, s in server.shapes.items()}, None)
    server.tensors.decode(down.factors, down.dense, _downlink_plan(shared0, True), uplink=False)
    # the same message read as a round-1 downlink (rank 3 / 4 expected) is refused
    with pytest.raises(UpdateDecodeError, match="rank 6, expected [234]"):
        server.tensors.decode(down.factors, down.dense, _downlink_plan(server.shared, True), uplink=False)


LATE = CodecConfig(rank=4, embed_rank=5, late_from=2, late_rank=2, late_downlink_rank=3)


def test_late_ranks_replace_every_class_from_late_from_on():
    ffn = "layers.0.ffn.w1.weight"
    assert [LATE.rank_for(n, r, True) for r in (1, 2, 7) for n in (ffn, "embed.weight")] == [4, 5, 2, 2, 2, 2]
    assert [LATE.rank_for(ffn, r, False) for r in (1, 2)] == [4, 3]
    with pytest.raises(ValidationError, match="late_from and late_rank"):
        CodecConfig(late_from=3)
    with pytest.raises(ValidationError, match="late_from and late_rank"):
        CodecConfig(late_downlink_rank=3)
    with pytest.raises(ValidationError, match=r"late_from \(1\) must not be below early_rounds \(2\)"):
        CodecConfig(early_rounds=2, early_rank=8, late_from=1, late_rank=2)


def test_late_rounds_send_smaller_updates_and_refuse_the_earlier_rank(state):
    server = ServerCodec(MODEL, LATE, state)
    client = ClientCodec(MODEL, LATE, server.shapes, "a")
    held, held_shared, chain, hashes, sizes, bounds = dict(state), server.shared, [], [server.global_hash()], [], []
    for r in range(4):
        plan = server.plan()
        msg = client.encode(held, _local(held, r), plan, None, 10)
        want = 2 if r >= 2 else None
        assert all(f.rank == (want or (5 if f.name == "embed.weight" else 4)) for f in msg.factors), r
        sizes.append(len(msg.SerializeToString()))
        bounds.append(server.max_update_bytes(plan))
        assert sizes[-1] <= bounds[-1]
        if r == 2:        # round 1's rank in round 2: refused
            early = ClientCodec(MODEL, LATE.model_copy(update={"late_from": 3}), server.shapes, "x").encode(
                held, _local(held, r), plan, None, 10)
            with pytest.raises(UpdateDecodeError, match="rank [45], expected 2"):
                server.decode(early, plan)
        agg = server.aggregator(plan)
        agg.add("a", server.decode(msg, plan))
        down = server.finish_round(plan, agg.finish(), agg.importance())
        assert all(f.rank == (3 if r >= 2 else 4) for f in down.factors)     # embed_rank is the uplink's
        chain.append(down.SerializeToString())
        hashes.append(server.global_hash())
        cp = plan_catchup(r, r + 1, [len(b) for b in chain], 10 ** 9)
        held, held_shared = apply_catchup(cp, catchup_payload(cp, chain, None), held, held_shared, MODEL, LATE,
                                          SEED, hashes[-1])
    assert sizes[2] < sizes[1] and bounds[2] < bounds[1] and bounds[3] == bounds[2]
    cp = plan_catchup(None, 4, [len(b) for b in chain], 10 ** 9)
    st, sh = apply_catchup(cp, catchup_payload(cp, chain, None), None, None, MODEL, LATE, SEED, hashes[4])
    assert model_hash(st) == server.global_hash() and sh.digest() == server.shared.digest()
