"""`fedmla coordinator`, `fedmla token ...` and `fedmla bench coordinator`."""

from __future__ import annotations

import inspect
import json
import logging
import types
import typing
from pathlib import Path

import typer
from pydantic import BaseModel

from .settings import CoordinatorSettings


def _is_json(annotation) -> bool:
    """Dicts and nested settings models are given as JSON objects on the command line."""
    return typing.get_origin(annotation) is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel))


def _flag_type(annotation):
    """The plain type a flag parses into (Optional[X] -> X, JSON objects -> str)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return str if _is_json(annotation) else annotation


def _coordinator_command(config: Path | None, log_level: str, **flags) -> None:
    from .server import serve
    from .settings import load_settings
    import asyncio
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, field in CoordinatorSettings.model_fields.items():
        if _is_json(field.annotation) and flags.get(name) is not None:
            if name == "codec" and not flags[name].lstrip().startswith("{"):
                continue     # a preset name ('fedavg', 'diloco', 'default'), resolved by the settings
            try:
                flags[name] = json.loads(flags[name])
            except json.JSONDecodeError as e:
                raise typer.BadParameter(f"not a JSON object: {e}", param_hint=f"--{name.replace('_', '-')}")
    try:
        settings = load_settings(config, **flags)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise typer.BadParameter(str(e), param_hint="--config / flags") from None
    from .errors import StoreError
    from .memory import tune_malloc
    tune_malloc()
    try:
        asyncio.run(serve(settings))
    except StoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


def _build_coordinator_command():
    params = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[Path],
                          default=typer.Option(None, "--config", help="settings file (YAML, JSON or TOML)")),
        inspect.Parameter("log_level", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("info", help="debug, info, warning, error")),
    ]
    for name, field in CoordinatorSettings.model_fields.items():
        t = _flag_type(field.annotation)
        flag_names = [f"--{name.replace('_', '-')}"] + (["--model"] if name == "model_dir" else [])
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[t],
                                        default=typer.Option(None, *flag_names,
                                                             help=f"{field.description or name} (default: "
                                                                  f"{field.get_default(call_default_factory=True)})",
                                                             show_default=False)))

    def coordinator(**kwargs):
        """Run the coordinator: gRPC server, rounds, store, metrics. Stops gracefully on SIGTERM."""
        _coordinator_command(**kwargs)
    coordinator.__signature__ = inspect.Signature(params)
    coordinator.__annotations__ = {p.name: p.annotation for p in params}
    return coordinator


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("coordinator")(_build_coordinator_command())

    token_app = typer.Typer(help="Per-client access tokens of a coordinator store.", no_args_is_help=True)
    app.add_typer(token_app, name="token")
    store_opt = typer.Option(Path("runs/coordinator"), "--store", help="coordinator store directory")

    @token_app.command("create")
    def token_create(client: str = typer.Option(..., "--client", help="client name the token identifies"),
                     store: Path = store_opt) -> None:
        """Create a token for CLIENT and print it (it is shown once; only its hash is stored)."""
        from .errors import StoreError
        from .store import Store
        try:
            s = Store(store)
            typer.echo(s.create_token(client))
        except (StoreError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)

    @token_app.command("revoke")
    def token_revoke(client: str = typer.Option(..., "--client"), store: Path = store_opt) -> None:
        """Revoke every token of CLIENT (a running coordinator refuses them at once)."""
        from .store import Store
        n = Store(store, create=False).revoke_tokens(client)
        typer.echo(f"revoked {n} token(s) of {client}")
        if n == 0:
            raise typer.Exit(1)

    @token_app.command("list")
    def token_list(store: Path = store_opt) -> None:
        """Tokens by client (ids and dates only; secrets are never stored)."""
        from .store import Store
        for t in Store(store, create=False).list_tokens():
            state = "revoked" if t["revoked_at"] else "active"
            typer.echo(f"{t['client']}\t{t['token_id']}\t{state}")

    @bench.command("coordinator")
    def bench_coordinator(
        clients: int = typer.Option(100, "--clients", help="concurrent loopback clients"),
        json_path: Path = typer.Option(None, "--json", help="write the figures here"),
        preset: str = typer.Option("small", help="model preset"),
        rounds: int = typer.Option(1, help="rounds to run"),
        codec: str = typer.Option("default", help="the coordinator's codec: a preset (default, fedavg, diloco) or a "
                                                  "JSON object of CodecConfig fields"),
        distinct_updates: int = typer.Option(8, help="distinct codec encodings the clients cycle through per round"),
    ) -> None:
        """N concurrent clients submit codec updates to a coordinator subprocess:
        updates/s ingested, p50/p99 submit latency, coordinator peak RSS."""
        from .bench import run_bench
        result = run_bench(clients=clients, preset=preset, rounds=rounds, codec=codec,
                           distinct_updates=distinct_updates)
        text = json.dumps(result, indent=2)
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(text + "\n")
        typer.echo(text)
