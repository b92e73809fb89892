"""``fedmla simulate``: a coordinator (in-process, or an existing one) plus N virtual clients on Ray.

A pool of K Ray actors each serves many virtual clients (Flower-simulation style): every
virtual client is a :class:`fedmla.worker.virtual.AsyncWorker` (the protocol of ``fedmla
worker``, driven by coroutines) with its own state directory, its own token and its own
gRPC channel to the coordinator over loopback; an actor runs all its clients on one event
loop, their training on one compute thread. The driver watches the coordinator's committed
versions, evaluates each new global model on the fixed validation windows and prints a
line per round; at the end a table (and ``--json``) with validation loss, bytes and time.

The coordinator runs its default codec mode: uplinks are the clients' codec updates
(active heads, low-rank, quantised), downloads the full state on a client's first round
and chains of compressed downlinks afterwards; both are the serialized bytes on the wire,
beside what FedAvg in fp32 would have sent.

The run's accounting (time, CPU and byte ratios, a baseline beside it) is in
:mod:`fedmla.worker.apps.sim_report`.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from fedmla.worker.data import DataError, FederatedData

from fedmla.worker.apps.placement import place_clients, sampled_per_actor
from fedmla.worker.apps.sim_report import cpu_breakdown, overhead, ratio, with_baseline


def _load_data(spec: str, clients: int, partition: str, seed: int, seq_len: int, tokenizer=None) -> FederatedData:
    from fedmla.worker.data import load_folder, load_stdlib_corpus, repartition
    if spec == "builtin":
        # Re-partitioned runs deal 2 KiB chunks of the 16 largest packages: read enough of
        # each for about four chunks per client (1000 clients: 8 MB of the standard library).
        per_source = 60_000 if partition == "natural" else max(60_000, -(-clients * 4 * 2048 // 16))
        data = load_stdlib_corpus(num_clients=clients if partition == "natural" else 16, seq_len=seq_len,
                                  max_bytes_per_client=per_source, tokenizer=tokenizer)
    else:
        data = load_folder(spec, seq_len=seq_len, tokenizer=tokenizer)
    if partition != "natural":
        data = repartition(data, clients, scheme=partition, seed=seed)
    if len(data.clients) < clients:
        raise DataError(f"{data.source} has {len(data.clients)} natural clients, fewer than --clients {clients}; "
                        f"use --partition iid or dirichlet")
    return data


def _start_ray(ray, address: str | None, cpus: int, log, attempts: int = 2) -> None:
    """ray.init; a local Ray whose raylet does not register in time, or whose GCS does not
    write its port file in time (both happen on a loaded machine), is shut down and
    started once more."""
    # Keep Ray from printing a FutureWarning about accelerator variables on every start (the
    # behaviour it announces is the one we want: no GPUs are asked for).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, num_cpus=None if address else cpus,
                     object_store_memory=None if address else 80 << 20,
                     include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            return
        except Exception as e:  # Ray raises a bare Exception for a node that timed out during startup
            if address is not None or attempt == attempts or not any(
                    m in str(e) for m in ("timed out during startup", "Timed out waiting for file")):
                raise
            log(f"local Ray did not start ({e}); starting it again")
            ray.shutdown()


def _client_actor_class():
    import ray

    @ray.remote(num_cpus=1)
    class ClientPool:
        """Runs many virtual clients on one asyncio event loop (fedmla.worker.virtual):
        every client an AsyncWorker with its own grpc.aio channel, training and the other
        heavy steps on one compute thread (the actor's CPU)."""

        def __init__(self):
            torch.set_num_threads(1)
            # torch.optim's first optimizer imports torch._dynamo (seconds of CPU): done while
            # the pool starts, not inside the first round the actor trains in.
            importlib.import_module("torch._dynamo")
            # the encoder's compiled quantiser (numba's import and its cache, ~0.75 s of CPU),
            # likewise loaded while the pool starts
            from fedmla.protos.codec.quant import warm_up
            warm_up()

        def run(self, target: str, clients: list[tuple[str, str, object]], state_root: str, ca: bytes | None) -> dict:
            from fedmla.protos.transport import TLSConfig
            from fedmla.protos.weights import model_hash
            from fedmla.worker.virtual import run_clients
            tls = TLSConfig(root_ca=ca) if ca else None
            cpu0 = time.process_time()
            # the clients' state dirs are a temporary dir of this run: written, not fsynced
            done = run_clients(target, clients, state_root, tls=tls, durable=False)
            return dict(cpu_seconds=time.process_time() - cpu0, clients=[
                dict(name=name, code=code, error=err, rounds=w.rounds_done, bytes_up=w.bytes_up,
                     bytes_down=w.bytes_down, fedavg_up=w.fedavg_up, fedavg_down=w.fedavg_down,
                     train_seconds=w.train_seconds, compute_seconds=w.compute_seconds, version=w.version,
                     hash=None if w.global_state is None else model_hash(w.global_state))
                for name, w, code, err in done])

    return ClientPool


def run_simulation(*, clients: int = 4, clients_per_round: int = 2, rounds: int = 5, preset: str = "tiny",
                   model: Path | None = None,
                   local_steps: int = 10, batch_size: int = 8, seq_len: int = 64, lr: float = 3e-3,
                   data: str = "builtin", partition: str = "natural", seed: int = 0, actors: int | None = None,
                   address: str | None = None, store: Path | None = None, coordinator: str | None = None,
                   token_dir: Path | None = None, ca: Path | None = None, dashboard_port: int | None = None,
                   dashboard_token: str | None = None, dashboard_linger: float = 0.0,
                   codec=None, log=print, progress=None, on_result=None) -> dict:
    """Run the simulation; returns the results table as a dict (see ``--json``).

    ``progress``, if given, is called about twice a second with a dict: ``round`` (open
    round id or None), ``replied``/``sampled`` (of the open round), ``committed`` (rounds
    committed so far), ``val_loss`` (latest), ``bytes_up``/``bytes_down`` (committed
    rounds, cumulative). ``on_result``, if given, gets the results as soon as the run
    is over (before a dashboard linger).

    ``model``: a Hugging Face DeepSeek-V2/V3 checkpoint folder to start from instead of
    ``preset``; the coordinator imports it and serves it to the clients like any model,
    and the clients' text is tokenized with its ``tokenizer.json`` (bytes without one).

    ``codec``: the coordinator's :class:`~fedmla.protos.codec.CodecConfig` (default: the
    product's default); ``CodecConfig.fedavg()`` / ``.diloco()`` run the uncompressed
    baselines through the same pipeline (``--baseline``)."""
    import os

    import ray

    from fedmla.coordinator.inprocess import BackgroundCoordinator
    from fedmla.coordinator.settings import CoordinatorSettings
    from fedmla.mla_model import MLAConfig
    from fedmla.mla_model.hf_checkpoint import read_hf_config
    from fedmla.worker.data import check_tokenizer_fits, model_tokenizer

    from fedmla.worker.trainer import LocalTrainer, TrainerConfig

    # The model's config.json alone (the weights go to the coordinator), to check the data against.
    model_cfg = read_hf_config(model)[1] if model is not None else MLAConfig.preset(preset)
    tokenizer = model_tokenizer(model)
    check_tokenizer_fits(tokenizer, model_cfg.vocab_size)
    fed = _load_data(data, clients, partition, seed, seq_len, tokenizer)
    tmp = tempfile.TemporaryDirectory(prefix="fedmla-sim-")
    bg = None
    # The cores belong to the client actors (one compute thread each); this process's
    # coordinator and evaluation run beside them on one torch thread: an OpenMP team of
    # one thread per core here spin-waits on the cores the actors train on (measured at
    # load ~4: evaluation CPU 2.3 s -> 1.1 s; same losses and model hash).
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0, t0_wall = time.monotonic(), time.time()
    try:
        if coordinator is None:
            settings = CoordinatorSettings(store=store or Path(tmp.name) / "store", host="127.0.0.1", port=0,
                                           **({"preset": preset} if model is None else {"model_dir": model}),
                                           rounds=rounds,
                                           clients_per_round=clients_per_round,
                                           # every client joins before the first round opens, so which
                                           # clients a round samples depends on the seed alone, never on
                                           # who joined first: a run is reproducible from its seed
                                           min_clients=clients,
                                           min_replies=clients_per_round, local_steps=local_steps, learning_rate=lr,
                                           batch_size=batch_size, seq_len=seq_len, seed=seed, round_timeout_s=300,
                                           # a virtual client beats only when silent this long (its
                                           # GetTask long polls, every task_long_poll_s, already
                                           # count): still 10x inside client_timeout_s
                                           client_timeout_s=300, heartbeat_interval_s=30,
                                           # an idle client's GetTask is held up to 50 s (the
                                           # most allowed; the default is 15): with a thousand
                                           # clients, 20 calls a second instead of 67
                                           task_long_poll_s=50,
                                           dashboard_port=dashboard_port, dashboard_token=dashboard_token,
                                           **({} if codec is None else {"codec": codec}))
            bg = BackgroundCoordinator(settings).start()
            target = bg.target
            names = [c.name for c in fed.clients[:clients]]
            tokens = {n: bg.call(lambda n=n: bg.store.create_token(n)) for n in names}
        else:
            if token_dir is None:
                raise DataError("--coordinator needs --token-dir (one token file per client, named after the client)")
            files = sorted(p for p in Path(token_dir).iterdir() if p.is_file())[:clients]
            if not files:
                raise DataError(f"--token-dir {token_dir} holds no token files")
            target, tokens = coordinator, {p.stem: p.read_text().strip() for p in files}
            names = list(tokens)
        if bg is not None and bg.server.dashboard is not None:
            log(f"dashboard: {bg.server.dashboard.url}")
        last_loss = None

        def report():
            if progress is None or bg is None:
                return
            def snap():
                c = bg.coord
                rnd = c.round
                up, down = c.store.db.execute("SELECT COALESCE(SUM(bytes_up), 0), COALESCE(SUM(bytes_down), 0) "
                                              "FROM rounds").fetchone()
                return dict(round=rnd.id if rnd else None, replied=len(rnd.replies) if rnd else 0,
                            sampled=len(rnd.sampled) if rnd else 0, committed=c.version - first_v,
                            bytes_up=up, bytes_down=down)
            progress({**bg.call(snap), "val_loss": last_loss})
        datas = {n: fed.clients[i] for i, n in enumerate(names)}
        evaluator = LocalTrainer(model_cfg, TrainerConfig(seq_len=seq_len, importance=False))

        eval_cpu = [0.0]

        def val_loss(state):
            t = time.thread_time()
            try:
                return evaluator.evaluate(state, fed.validation)["loss"]
            finally:
                eval_cpu[0] += time.thread_time() - t

        initial = last_loss = val_loss(bg.coord.state) if bg else None
        k = actors or max(1, min(len(names), os.cpu_count() or 1))
        _start_ray(ray, address, k, log)
        try:
            first_round = bg.call(lambda: bg.store.db.execute(      # rounds of an earlier run in --store
                "SELECT COALESCE(MAX(id), -1) FROM rounds").fetchone()[0]) if bg else None
            pool_cls = _client_actor_class()
            pools = [pool_cls.remote() for _ in range(k)]
            ca_bytes = Path(ca).read_bytes() if ca else None
            if bg is not None:
                # our coordinator: its seeded sampling is known, so each round's sampled
                # clients are spread evenly over the actors (a round lasts as long as its
                # busiest actor); every client has joined before the first round opens
                from fedmla.coordinator.registry import sample_round
                start, population = bg.call(lambda: bg.coord.next_round_id), sorted(names)
                ahead = [sample_round(seed, rid, population, clients_per_round)
                         for rid in range(start, start + rounds)]
                groups = place_clients(names, k, ahead)
                placement = dict(clients_per_actor=[len(g) for g in groups],
                                 sampled_per_actor=sampled_per_actor(groups, ahead))
            else:
                groups, placement = [names[i::k] for i in range(k)], None
            work = [pools[i].run.remote(target, [(n, tokens[n], datas[n]) for n in groups[i]],
                                        str(Path(tmp.name) / "clients"), ca_bytes) for i in range(k)]
            per_round, last_v, t_round = [], bg.coord.version if bg else None, time.monotonic()
            driver_cpu0 = time.process_time()
            cpu_open = cpu_commit = None    # this process's CPU when the first round opened / at the last commit
            first_v = last_v
            pending = list(work)
            while True:
                if pending:
                    _, pending = ray.wait(pending, timeout=0.5, num_returns=len(pending))
                if cpu_open is None and bg is not None and bg.coord.round is not None:
                    cpu_open = time.process_time()
                report()
                # Checked once more after the clients finish: the last commit can land in
                # the same wait as the clients' exit.
                if bg is not None and bg.coord.version != last_v:
                    prev_v, last_v = last_v, bg.coord.version
                    now = time.monotonic()
                    cpu_commit = time.process_time()
                    loss = last_loss = val_loss(bg.coord.state)
                    # The global model's held-out loss goes into the round's row (dashboard, store).
                    bg.call(lambda v=last_v, x=loss: bg.store.set_val_loss(v, x))
                    per_round.append(dict(version=last_v, val_loss=loss, seconds=now - t_round))
                    t_round = now
                    # two commits can land between two polls: name both rounds, evaluate the latest
                    done = f"{prev_v - first_v + 1}-{last_v - first_v}" if last_v - prev_v > 1 else f"{last_v - first_v}"
                    log(f"round {done}/{rounds}: model v{last_v} val loss {loss:.4f} "
                        f"({per_round[-1]['seconds']:.1f}s)")
                elif not pending:
                    break
            pool_out = ray.get(work)
            results = [dict(r, actor=i) for i, out in enumerate(pool_out) for r in out["clients"]]
            driver_cpu = time.process_time() - driver_cpu0
        finally:
            for p in locals().get("pools", []):
                ray.kill(p)
            ray.shutdown()
        failed = [r for r in results if r["code"] != 0]
        if failed:
            raise RuntimeError("; ".join(f"client {r['name']}: exit {r['code']} {r['error']}" for r in failed))
        final = val_loss(bg.coord.state) if bg else None
        # The rounds' wall time on the coordinator's clock: first opening to last commit
        # (the start of Ray and of the clients, and their joins, come before: startup).
        rounds_wall = startup = None
        if bg is not None:
            span = bg.call(lambda: bg.store.db.execute(
                "SELECT MIN(started_at), MAX(ended_at) FROM rounds WHERE status='committed' AND id > ?",
                (first_round,)).fetchone())
            if span[0] is not None:
                rounds_wall, startup = span[1] - span[0], span[0] - t0_wall
        # Committed versions, not observed ones: two commits can fall between two polls.
        out = dict(rounds=(bg.coord.version - first_v) if bg else max(r["rounds"] for r in results),
                   initial_val_loss=initial, final_val_loss=final,
                   bytes_up=sum(r["bytes_up"] for r in results), bytes_down=sum(r["bytes_down"] for r in results),
                   bytes_total=sum(r["bytes_up"] + r["bytes_down"] for r in results),
                   fedavg_fp32_bytes=sum(r["fedavg_up"] + r["fedavg_down"] for r in results),
                   fedavg_fp32_bytes_up=sum(r["fedavg_up"] for r in results),
                   fedavg_fp32_bytes_down=sum(r["fedavg_down"] for r in results),
                   # everything both ways (first downloads and catch-ups included) against FedAvg fp32
                   total_ratio_vs_fedavg_fp32=ratio(sum(r["fedavg_up"] + r["fedavg_down"] for r in results),
                                                     sum(r["bytes_up"] + r["bytes_down"] for r in results)),
                   uplink_ratio_vs_fedavg_fp32=ratio(sum(r["fedavg_up"] for r in results),
                                                      sum(r["bytes_up"] for r in results)),
                   seconds=time.monotonic() - t0, per_round=per_round, data_source=fed.source,
                   startup_seconds=startup,
                   **overhead(per_round, results, rounds_wall),
                   cpu_seconds=cpu_breakdown(results, [o["cpu_seconds"] for o in pool_out],
                                              driver_cpu if bg is not None else None,
                                              None if cpu_open is None or cpu_commit is None else cpu_commit - cpu_open,
                                              eval_cpu[0]),
                   coordinator_hash=bg.coord.model_sha if bg else None,
                   placement=placement,
                   clients={r["name"]: {k2: r[k2] for k2 in ("rounds", "bytes_up", "bytes_down", "version", "hash",
                                                             "actor")}
                            for r in results})
        if on_result is not None:
            on_result(out)
        if bg is not None and bg.server.dashboard is not None and dashboard_linger > 0:
            log(f"run finished; the dashboard stays up for {dashboard_linger:.0f} s (Ctrl-C to stop): "
                f"{bg.server.dashboard.url}")
            try:
                time.sleep(dashboard_linger)
            except KeyboardInterrupt:
                pass
        return out
    finally:
        if bg is not None:
            bg.stop()
        tmp.cleanup()
        torch.set_num_threads(torch_threads)


BASELINES = {"fedavg": "FedAvg fp32", "diloco": "DiLoCo fp32"}    # the coordinator's codec presets of that name


def register(app, bench) -> None:
    import typer

    @app.command("simulate")
    def simulate_cmd(
        clients: int = typer.Option(4, "--clients", min=1),
        clients_per_round: int = typer.Option(2, "--clients-per-round", min=1),
        rounds: int = typer.Option(6, "--rounds", min=1),
        preset: str = typer.Option(None, "--preset", help="model preset of a new run (default: tiny)"),
        model: Path = typer.Option(None, "--model", help="start from this Hugging Face DeepSeek-V2/V3 checkpoint "
                                   "folder instead of --preset; its tokenizer.json (if any) tokenizes the data"),
        local_steps: int = typer.Option(10, "--local-steps", min=1),
        data: str = typer.Option("builtin", "--data", help="'builtin' or a folder of client data"),
        partition: str = typer.Option("natural", "--partition", help="natural | iid | dirichlet"),
        seed: int = typer.Option(0, "--seed"),
        actors: int = typer.Option(None, "--actors", help="Ray actors (default: min(clients, CPUs))"),
        address: str = typer.Option(None, "--address", help="existing Ray cluster (default: a local one)"),
        store: Path = typer.Option(None, "--store", help="coordinator store (default: a temp dir)"),
        coordinator: str = typer.Option(None, "--coordinator", help="HOST:PORT: run only the clients against it"),
        token_dir: Path = typer.Option(None, "--token-dir", help="with --coordinator: one token file per client"),
        ca: Path = typer.Option(None, "--ca", help="CA certificate (PEM) of a TLS coordinator"),
        json_path: Path = typer.Option(None, "--json", help="write the results as JSON"),
        dashboard_port: int = typer.Option(None, "--dashboard-port",
                                           help="serve the run's dashboard on 127.0.0.1:PORT (0: any free port; unset: off)"),
        dashboard_token: str = typer.Option(None, "--dashboard-token", envvar="FEDMLA_DASHBOARD_TOKEN",
                                            help="token the dashboard requires (Bearer header or ?token=)"),
        dashboard_linger: float = typer.Option(0.0, "--dashboard-linger", min=0,
                                               help="keep the dashboard up this many seconds after the run "
                                                    "(Ctrl-C ends it sooner)"),
        baseline: str = typer.Option(None, "--baseline", help=(
            "then run the same clients, seed and rounds with an uncompressed pipeline and print both side by "
            "side: 'fedavg' (FedAvg, fp32 both ways) or 'diloco' (DiLoCo: fp32 both ways, outer Nesterov)")),
    ) -> None:
        """Federated training of N virtual clients on Ray against a real gRPC coordinator.

        Starts a coordinator on 127.0.0.1 (or uses --coordinator), a pool of Ray actors that
        each serve many virtual clients (every one a real `fedmla worker` with its own gRPC
        channel), shows progress bars and a line per committed round, and ends with a table
        of validation loss, bytes up/down against FedAvg in fp32, and time per round.
        With --baseline the same clients then train with an uncompressed pipeline and the
        table shows both runs' measured bytes and losses side by side."""
        from rich.console import Console
        from rich.table import Table

        from fedmla.coordinator.errors import StoreError
        from fedmla.coordinator.settings import CODEC_PRESETS
        from fedmla.mla_model.hf import HFCheckpointError
        if partition not in ("natural", "iid", "dirichlet"):
            typer.echo(f"error: --partition must be natural, iid or dirichlet, not {partition!r}", err=True)
            raise typer.Exit(2)
        if preset is not None and model is not None:
            typer.echo("error: give --preset or --model, not both (a checkpoint brings its own model config)", err=True)
            raise typer.Exit(2)
        preset = preset or "tiny"
        if baseline is not None and baseline not in BASELINES:
            typer.echo(f"error: --baseline must be one of {', '.join(BASELINES)}, not {baseline!r}", err=True)
            raise typer.Exit(2)
        if baseline is not None and coordinator is not None:
            typer.echo("error: --baseline needs the simulation's own coordinator (it runs a second one with the "
                       "baseline's codec); leave out --coordinator", err=True)
            raise typer.Exit(2)
        if clients_per_round > clients:
            typer.echo(f"error: --clients-per-round {clients_per_round} exceeds --clients {clients}", err=True)
            raise typer.Exit(2)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        console = Console(stderr=True)
        # Live bars on a terminal; on a pipe or in CI Rich draws nothing live, and the
        # per-round lines below still go out.
        bars = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=True,
                        # the numbers change about twice a second (on_progress): redrawing
                        # at Rich's default 10/s only took CPU from the clients
                        refresh_per_second=2)
        rounds_bar = bars.add_task("rounds", total=rounds, info="")
        replies_bar = bars.add_task("replies", total=clients_per_round, info="", visible=False)

        def on_progress(p):
            def mb(n):
                return f"{n / 1e6:.2f} MB"
            loss = "-" if p["val_loss"] is None else f"{p['val_loss']:.4f}"
            bars.update(rounds_bar, completed=p["committed"],
                        info=f"val loss {loss}  up {mb(p['bytes_up'])}  down {mb(p['bytes_down'])}")
            if p["round"] is not None:
                bars.update(replies_bar, description=f"round {p['round']}", completed=p["replied"],
                            total=max(p["sampled"], 1), visible=True, info="replies")
            else:
                bars.update(replies_bar, visible=False)
        def show(res):
            base = res.get("baseline")
            t = Table(title="fedmla simulate")
            t.add_column("metric")
            t.add_column("fedmla", justify="right")
            if base is not None:
                t.add_column(BASELINES[base["name"]] + " (measured)", justify="right")

            def f(x, fmt):
                return "-" if x is None else format(x, fmt)

            def row(label, key, fmt, ours_only=False, unit=""):
                cells = [f(res.get(key), fmt) + unit]
                if base is not None:
                    cells.append("" if ours_only else f(base.get(key), fmt) + unit)
                t.add_row(label, *cells)
            row("rounds", "rounds", "d")
            row("val loss initial", "initial_val_loss", ".4f")
            row("val loss final", "final_val_loss", ".4f")
            row("bytes up", "bytes_up", ",")
            row("bytes down", "bytes_down", ",")
            row("bytes total", "bytes_total", ",")
            t.add_row("FedAvg fp32 up / down", f"{res['fedavg_fp32_bytes_up']:,} / {res['fedavg_fp32_bytes_down']:,}",
                      *([""] if base is not None else []))
            row("fewer bytes than FedAvg fp32, total (up + down)", "total_ratio_vs_fedavg_fp32", ".1f", True, "x")
            row("fewer bytes than FedAvg fp32, uplink only", "uplink_ratio_vs_fedavg_fp32", ".1f", True, "x")
            if base is not None:
                vs = res["ratio_vs_baseline"]
                t.add_row(f"fewer bytes than the {base['name']} run (all/up/down)",
                          f"{f(vs['total'], '.1f')}x / {f(vs['up'], '.1f')}x / {f(vs['down'], '.1f')}x", "")
            secs = [r["seconds"] for r in res["per_round"]]
            bsecs = [r["seconds"] for r in base["per_round"]] if base is not None else []
            t.add_row("time per round (s)", f(sum(secs) / len(secs), ".1f") if secs else "-",
                      *([f(sum(bsecs) / len(bsecs), ".1f") if bsecs else "-"] if base is not None else []))
            row("total time (s)", "seconds", ".1f")
            Console().print(t)
            if json_path is not None:
                json_path.write_text(json.dumps(res, indent=2))

        common = dict(clients=clients, clients_per_round=clients_per_round, rounds=rounds, preset=preset, model=model,
                      local_steps=local_steps, data=data, partition=partition, seed=seed, actors=actors,
                      address=address, coordinator=coordinator, token_dir=token_dir, ca=ca,
                      log=bars.console.print, progress=on_progress)
        try:
            with bars:
                if baseline is None:   # the table and --json are written as soon as the run is over
                    run_simulation(**common, store=store, dashboard_port=dashboard_port,
                                   dashboard_token=dashboard_token, dashboard_linger=dashboard_linger, on_result=show)
                else:
                    ours = run_simulation(**common, store=store, dashboard_port=dashboard_port,
                                          dashboard_token=dashboard_token, dashboard_linger=dashboard_linger)
                    bars.console.print(f"baseline: the same clients with {BASELINES[baseline]}")
                    bars.reset(rounds_bar)
                    theirs = run_simulation(**common, codec=CODEC_PRESETS[baseline]())
            if baseline is not None:
                show(with_baseline(ours, theirs, baseline))
        except DataError as e:
            typer.echo(f"error: bad data: {e}", err=True)
            raise typer.Exit(2)
        except (HFCheckpointError, StoreError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except RuntimeError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1)

