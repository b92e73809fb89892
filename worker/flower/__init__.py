"""Flower apps for fedmla: a ServerApp whose strategy uses fedmla's codec and exact
aggregation (or Flower's own FedAvg as the baseline) and a ClientApp running the one
local trainer. ``flwr run .`` uses ``fedmla.worker.flower.server_app:app`` and
``fedmla.worker.flower.client_app:app``; Python callers use :func:`run_flower_simulation`.
"""

from .config import FlowerConfig, load_federated_data


def run_flower_simulation(config=None, verbose: bool = False) -> dict:
    """See :func:`worker.flower.server_app.run_flower_simulation` (imported lazily: Flower
    and Ray load only when a simulation runs)."""
    from .server_app import run_flower_simulation as run
    return run(config, verbose=verbose)


__all__ = ["FlowerConfig", "load_federated_data", "run_flower_simulation"]
