"""The `fedmla` command line.

Each area of the project owns its commands and registers them here through a
``register(app, bench)`` function, so that this file stays a table of contents.
"""

from __future__ import annotations

import importlib
import os

# Ray starts its workers by forking while gRPC channels are open in this process, and gRPC
# core then logs "skipping fork() handlers" at INFO level on every fork: keep gRPC's own
# log to errors (set before grpc is imported; a user's GRPC_VERBOSITY wins).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import typer  # noqa: E402

app = typer.Typer(
    name="fedmla",
    help="Federated training of MLA transformers with low-rank, quantized updates.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",     # docstrings reflow as paragraphs in --help (no ragged lines)
    add_completion=False,
)
bench = typer.Typer(help="Benchmarks. Each writes its figures as JSON (--json PATH).", no_args_is_help=True)
app.add_typer(bench, name="bench")

# Modules that define a `register(app, bench)` function adding their commands.
COMMAND_MODULES = [
    "fedmla.mla_model.cli",
    "fedmla.coordinator.dashboard.cli",
    "fedmla.worker.apps.bench_kernels",
    "fedmla.worker.apps.bench_comm",
    "fedmla.coordinator.commands",
    "fedmla.coordinator.export",
    "fedmla.worker.cli",
    "fedmla.worker.apps.simulate",
    "fedmla.worker.apps.bench_attacks",
]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app, bench)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
