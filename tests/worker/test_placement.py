"""Placement of simulate's virtual clients on its client actors (fedmla.worker.apps.placement)."""

import pytest

from fedmla.coordinator.registry import sample_round
from fedmla.worker.apps.placement import place_clients, sampled_per_actor

NAMES = [f"client-{i:03d}" for i in range(1000)]


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_each_rounds_sample_is_split_evenly(seed):
    ahead = [sample_round(seed, rid, NAMES, 50) for rid in range(1, 5)]
    groups = place_clients(NAMES, 2, ahead)
    assert sampled_per_actor(groups, ahead) == [[25, 25]] * 4
    # dealing the clients out in turn, as before, leaves rounds uneven for these seeds
    dealt = [NAMES[i::2] for i in range(2)]
    assert any(abs(a - b) > 1 for a, b in sampled_per_actor(dealt, ahead))


def test_every_client_placed_once_in_order_and_groups_even():
    ahead = [sample_round(5, rid, NAMES, 40) for rid in range(1, 9)]
    groups = place_clients(NAMES, 3, ahead)
    placed = [n for g in groups for n in g]
    assert sorted(placed) == NAMES and len(placed) == len(set(placed))
    assert all(g == sorted(g, key=NAMES.index) for g in groups)
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    for row in sampled_per_actor(groups, ahead):
        assert sum(row) == 40 and max(row) - min(row) <= 1


def test_a_client_sampled_again_stays_where_it_is():
    names = ["a", "b", "c", "d"]
    groups = place_clients(names, 2, [["a", "b"], ["a", "c"], ["b", "c"]])
    where = {n: i for i, g in enumerate(groups) for n in g}
    assert where["a"] != where["b"] and where["a"] != where["c"]      # rounds 1 and 2 split evenly
    assert sorted(sampled_per_actor(groups, [["b", "c"]])[0]) == [0, 2]   # where round 3 cannot be even
    assert sorted(len(g) for g in groups) == [2, 2]                   # d fills the lighter actor


def test_unknown_sampled_names_are_ignored_and_actors_must_be_positive():
    assert place_clients(["a", "b"], 1, [["a", "zz"]]) == [["a", "b"]]
    with pytest.raises(ValueError, match="actors"):
        place_clients(["a"], 0, [])
