"""`fedmla worker`: one worker process against a running coordinator."""

from __future__ import annotations

from pathlib import Path

import grpc

from fedmla.protos.transport import TLSConfig

from .data import ClientData, DataError
from .runtime import Worker, WorkerOptions


def load_client_data(spec: str, client_index: int | None, name: str, tokenizer=None) -> ClientData:
    """``builtin`` (standard-library corpus, client ``client_index``) or a folder path;
    ``tokenizer`` (a :class:`~fedmla.worker.data.TextTokenizer`): token ids instead of bytes."""
    from .data import load_folder, load_stdlib_corpus
    if spec == "builtin":
        data = load_stdlib_corpus(tokenizer=tokenizer)
    else:
        p = Path(spec)
        if not p.exists():
            raise DataError(f"data path {spec!r} (client {name!r}) does not exist")
        data = load_folder(p, tokenizer=tokenizer)
    if client_index is None:
        names = data.names
        if name in names:
            return data.client(name)
        client_index = 0
    if not 0 <= client_index < len(data.clients):
        raise DataError(f"--client-index {client_index} is out of range: {data.source} has "
                        f"{len(data.clients)} clients")
    return data.clients[client_index]


def register(app, bench) -> None:
    import typer

    @app.command("worker")
    def worker_cmd(
        coordinator: str = typer.Option(..., "--coordinator", help="HOST:PORT of the coordinator"),
        name: str = typer.Option(..., "--name", help="this worker's name (logs; selects a folder client)"),
        token: str = typer.Option(None, "--token", help="access token (or --token-file)"),
        token_file: Path = typer.Option(None, "--token-file", help="file holding the access token"),
        ca: Path = typer.Option(None, "--ca", help="CA certificate (PEM): use TLS"),
        cert: Path = typer.Option(None, "--cert", help="client certificate (mutual TLS)"),
        key: Path = typer.Option(None, "--key", help="client key (mutual TLS)"),
        state_dir: Path = typer.Option(..., "--state-dir", help="directory for the worker's restart state"),
        data: str = typer.Option("builtin", "--data", help="'builtin' or a folder of client data"),
        client_index: int = typer.Option(None, "--client-index", help="which client of the data to be"),
        tokenizer: Path = typer.Option(None, "--tokenizer", help=(
            "tokenizer.json (or a checkpoint folder holding one) of a run started with --model: tokenize the data "
            "with it, as the coordinator's model expects (default: bytes)")),
    ) -> None:
        """Take part in federated rounds until the coordinator's run is finished."""
        if (token is None) == (token_file is None):
            typer.echo("error: give exactly one of --token and --token-file", err=True)
            raise typer.Exit(2)
        if token_file is not None:
            try:
                token = token_file.read_text().strip()
            except OSError as e:
                typer.echo(f"error: cannot read --token-file {token_file}: {e.strerror}", err=True)
                raise typer.Exit(2)
        if (cert is None) != (key is None):
            typer.echo("error: --cert and --key go together", err=True)
            raise typer.Exit(2)
        tls = TLSConfig(root_ca=ca, cert=cert, key=key) if ca or cert else None
        try:
            from .data import TextTokenizer
            client_data = load_client_data(data, client_index, name,
                                           TextTokenizer.from_path(tokenizer) if tokenizer is not None else None)
            from fedmla.protos.codec.quant import warm_up
            warm_up()        # the encoder's compiled quantiser, loaded once before the first round
            w = Worker(WorkerOptions(coordinator, token, state_dir, tls=tls,
                                     log=lambda m: typer.echo(f"[{name}] {m}", err=True)), client_data)
            code = w.run()
        except DataError as e:
            typer.echo(f"error: bad data for worker {name!r}: {e}", err=True)
            raise typer.Exit(2)
        except grpc.RpcError as e:
            typer.echo(f"error: coordinator {coordinator}: {e.code().name}: {e.details()}", err=True)
            raise typer.Exit(1)
        raise typer.Exit(code)
