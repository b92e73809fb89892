"""The accounting of a ``fedmla simulate`` run: where the machine's time went (core-time
per client-round outside the trainers, CPU seconds by step and process), byte ratios,
and a baseline run's figures beside ours."""

from __future__ import annotations


def overhead(per_round: list[dict], results: list[dict], rounds_wall: float | None = None) -> dict:
    """Where the machine's time went during the rounds: client-rounds, CPU seconds inside
    the local trainers, and the core-time per client-round not spent training (an upper
    bound on the overhead of the coordinator, gRPC, Ray, idle waiting and the driver's
    evaluation: with few clients per round the cores also sit idle between rounds).

    ``rounds_wall``: seconds from the first round's opening to the last commit (the
    coordinator's clock); without it (a remote coordinator) the driver's observation,
    which also holds the start of Ray and the clients' joins."""
    import os
    client_rounds = sum(r["rounds"] for r in results)
    train = sum(r.get("train_seconds", 0.0) for r in results)
    wall = rounds_wall if rounds_wall is not None else sum(r["seconds"] for r in per_round)
    cores = os.cpu_count() or 1
    over = 1000 * (wall * cores - train) / client_rounds if client_rounds else None
    return dict(client_rounds=client_rounds, train_seconds=train, round_seconds=wall, cores=cores,
                overhead_ms_per_client_round=over,
                rounds_per_minute=60 * len(per_round) / wall if wall else None)


def cpu_breakdown(results: list[dict], actor_cpu: list[float], driver_cpu: float | None,
                   driver_cpu_in_rounds: float | None, evaluation_cpu: float) -> dict:
    """CPU seconds of the run by where they were spent: the client actors' heavy steps
    (training, syncing, encoding, ... summed over clients), the rest of the actors'
    processes (event loop, gRPC, Ray, the clients' joins), and this process (the
    in-process coordinator with its gRPC server, and the driver's evaluation of each
    committed model; None with ``--coordinator``), over the run and between the first
    round's opening and the last commit."""
    steps: dict[str, float] = {}
    for r in results:
        for name, sec in r.get("compute_seconds", {}).items():
            steps[name] = steps.get(name, 0.0) + sec
    actors = sum(actor_cpu)
    return dict(client_steps=dict(sorted(steps.items(), key=lambda kv: -kv[1])), client_actors=actors,
                client_actors_outside_steps=actors - sum(steps.values()), coordinator_and_driver=driver_cpu,
                coordinator_and_driver_in_rounds=driver_cpu_in_rounds, driver_evaluation=evaluation_cpu)


def ratio(baseline: int, ours: int) -> float | None:
    return baseline / ours if ours else None


def with_baseline(ours: dict, theirs: dict, name: str) -> dict:
    """Our results with a baseline run's beside them: ``baseline`` (its figures) and
    ``ratio_vs_baseline`` (its measured bytes over ours: total, up, down)."""
    keys = ("rounds", "initial_val_loss", "final_val_loss", "bytes_up", "bytes_down", "bytes_total", "seconds",
            "per_round", "coordinator_hash")
    return {**ours, "baseline": {"name": name, **{k: theirs[k] for k in keys}},
            "ratio_vs_baseline": {"total": ratio(theirs["bytes_total"], ours["bytes_total"]),
                                  "up": ratio(theirs["bytes_up"], ours["bytes_up"]),
                                  "down": ratio(theirs["bytes_down"], ours["bytes_down"])}}
