"""Which client actor of ``fedmla simulate`` runs which virtual client.

Each actor trains its sampled clients one after another on its one compute thread, so a
round lasts as long as its busiest actor: with clients dealt out in turn, 50 sampled
clients split 22/28 as often as 25/25, and the lighter actor's core idles for the
difference. When the simulation runs its own coordinator it knows the seeded sampling
(:func:`fedmla.coordinator.registry.sample_round`, the function the coordinator calls), so
it can place the clients each round will sample evenly before the run starts. Placement
changes only where a client's steps run, never what they compute.
"""

from __future__ import annotations


def place_clients(names: list[str], actors: int, rounds_sampled: list[list[str]]) -> list[list[str]]:
    """``names`` split over ``actors`` lists (each in ``names`` order): round by round,
    every sampled client not yet placed goes to the actor with the fewest of that round's
    sampled clients (then the fewest clients overall), so each round's sample is spread
    as evenly as clients sampled in earlier rounds allow; clients no round samples are
    dealt to the actors with the fewest clients."""
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    known = set(names)
    where: dict[str, int] = {}
    total = [0] * actors
    for sampled in rounds_sampled:
        load = [0] * actors
        for n in sampled:
            if n in where:
                load[where[n]] += 1
        for n in sampled:
            if n in known and n not in where:
                a = min(range(actors), key=lambda i: (load[i], total[i], i))
                where[n] = a
                load[a] += 1
                total[a] += 1
    for n in names:
        if n not in where:
            a = min(range(actors), key=lambda i: (total[i], i))
            where[n] = a
            total[a] += 1
    return [[n for n in names if where[n] == i] for i in range(actors)]


def sampled_per_actor(groups: list[list[str]], rounds_sampled: list[list[str]]) -> list[list[int]]:
    """For each round, how many of its sampled clients each actor runs."""
    where = {n: i for i, g in enumerate(groups) for n in g}
    out = []
    for sampled in rounds_sampled:
        row = [0] * len(groups)
        for n in sampled:
            if n in where:
                row[where[n]] += 1
        out.append(row)
    return out
