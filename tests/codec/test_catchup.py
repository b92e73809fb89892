"""Catch-up planning (hand-computed sizes) and the worker side of every path (hash-checked)."""

import pytest
import torch

from fedmla.mla_model import MLAConfig, init_global_state
from fedmla.protos.codec import CodecConfig, ServerCodec
from fedmla.protos.codec.catchup import (CatchupError, CatchupPlan, apply_catchup, catchup_payload, plan_catchup,
                                         version_for_hash)
from fedmla.protos.codec.transfer import encode_full_state
from fedmla.protos.weights import model_hash

MODEL = MLAConfig.preset("tiny")
SEED = 3


# ---- planning -----------------------------------------------------------------------------------

def test_nothing_held_replays_from_the_seed_while_that_is_smaller():
    assert plan_catchup(None, 3, [10, 20, 30], 100) == CatchupPlan("chain", 0, 3, 60, from_seed=True)
    assert plan_catchup(None, 3, [10, 20, 30], 59) == CatchupPlan("full", 3, 3, 59)
    # a tie goes to the chain
    assert plan_catchup(None, 3, [10, 20, 30], 60).kind == "chain"
    # version 0 from the seed costs nothing
    assert plan_catchup(None, 0, [], 100) == CatchupPlan("chain", 0, 0, 0, from_seed=True)


def test_held_version_replays_only_the_missing_downlinks():
    p = plan_catchup(1, 3, [10, 20, 30], 100)
    assert (p.kind, p.start, p.target, p.bytes, p.from_seed, p.downlinks) == ("chain", 1, 3, 50, False, 2)
    assert plan_catchup(1, 3, [10, 20, 30], 49).kind == "full"
    assert plan_catchup(3, 3, [10, 20, 30], 100) == CatchupPlan("none", 3, 3, 0)


def test_pruned_chain_or_unseeded_start_falls_back_to_the_full_state():
    assert plan_catchup(0, 3, [None, 20, 30], 1000).kind == "full"
    assert plan_catchup(1, 3, [None, 20, 30], 1000).bytes == 50      # the pruned part is not needed
    assert plan_catchup(None, 2, [1, 1], 1000, seeded=False) == CatchupPlan("full", 2, 2, 1000)


@pytest.mark.parametrize("args", [(4, 3, [1, 1, 1], 10), (-1, 3, [1, 1, 1], 10), (None, 3, [1, 1], 10),
                                  (None, 1, [1], 0), (None, -1, [], 10)])
def test_bad_plans_are_refused(args):
    with pytest.raises(ValueError):
        plan_catchup(*args)


def test_version_for_hash():
    hashes = ["a", "b", "c", "b"]
    assert version_for_hash("c", hashes) == 2
    assert version_for_hash("b", hashes) == 3          # the latest of equal hashes
    assert version_for_hash("z", hashes) is None
    assert version_for_hash(None, hashes) is None


# ---- applying -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def history():
    """A coordinator after 3 rounds of the headline codec (replicated momentum) with
    synthetic aggregates: its downlinks, its state and the hash of every version."""
    cfg = CodecConfig(rank=2)
    server = ServerCodec(MODEL, cfg, init_global_state(MODEL, SEED))
    g = torch.Generator().manual_seed(0)
    chain, hashes, held = [], [server.global_hash()], {}
    for r in range(3):
        plan = server.plan()
        agg = {n: 1e-2 * torch.randn(s, generator=g) for n, s in server.shapes.items()}
        chain.append(server.finish_round(plan, agg, None).SerializeToString())
        hashes.append(server.global_hash())
        held[r + 1] = ({n: t.clone() for n, t in server.global_state.items()}, server.shared)
    return cfg, server, chain, hashes, held


def test_chain_from_seed_rebuilds_weights_and_momentum(history):
    cfg, server, chain, hashes, _ = history
    full = encode_full_state(server.global_state, server.shared)
    plan = plan_catchup(None, 3, [len(b) for b in chain], len(full))
    assert plan.kind == "chain" and plan.from_seed and plan.bytes == sum(len(b) for b in chain)
    payload = catchup_payload(plan, chain, lambda: full)
    state, shared = apply_catchup(plan, payload, None, None, MODEL, cfg, SEED, hashes[3])
    assert model_hash(state) == server.global_hash()
    assert shared.momentum and shared.digest() == server.shared.digest()   # momentum never shipped
    # the full state carries the fp32 momentum: about twice the weights
    assert len(full) > 1.9 * sum(t.numel() * 4 for t in state.values())


def test_chain_from_held_version_and_full_state(history):
    cfg, server, chain, hashes, held = history
    st, sh = held[1]
    plan = plan_catchup(1, 3, [len(b) for b in chain], 10 ** 9)
    state, shared = apply_catchup(plan, catchup_payload(plan, chain, None), st, sh, MODEL, cfg, SEED, hashes[3])
    assert model_hash(state) == hashes[3] and shared.round == 3
    full = encode_full_state(server.global_state, server.shared)
    plan = plan_catchup(1, 3, [len(b) for b in chain], 1)
    assert plan.kind == "full"
    state, shared = apply_catchup(plan, catchup_payload(plan, chain, lambda: full), st, sh, MODEL, cfg, SEED,
                                  hashes[3])
    assert model_hash(state) == hashes[3] and shared.digest() == server.shared.digest()
    plan = plan_catchup(3, 3, [len(b) for b in chain], 1)
    st3, sh3 = held[3]
    assert apply_catchup(plan, None, st3, sh3, MODEL, cfg, SEED, hashes[3])[0] is st3


def test_every_path_checks_the_hash(history):
    cfg, server, chain, hashes, held = history
    sizes = [len(b) for b in chain]
    plan = plan_catchup(None, 3, sizes, 10 ** 9)
    with pytest.raises(CatchupError, match="hash"):          # another seed: another initial model
        apply_catchup(plan, chain, None, None, MODEL, cfg, SEED + 1, hashes[3])
    with pytest.raises(CatchupError, match="hash"):          # announced the wrong version's hash
        apply_catchup(plan, chain, None, None, MODEL, cfg, SEED, hashes[2])
    with pytest.raises(CatchupError, match="downlinks"):     # a downlink missing
        apply_catchup(plan, chain[:2], None, None, MODEL, cfg, SEED, hashes[3])
    st, sh = held[2]
    with pytest.raises(CatchupError, match="starts at version 1"):   # holds 2, chain from 1
        apply_catchup(plan_catchup(1, 3, sizes, 10 ** 9), chain[1:], st, sh, MODEL, cfg, SEED, hashes[3])
    with pytest.raises(ValueError, match="not all stored"):
        catchup_payload(plan_catchup(1, 3, sizes, 10 ** 9), [None, None, chain[2]], None)
