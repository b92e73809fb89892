"""Every `fedmla ...` command line in the deploy files parses against the real CLI, and
the coordinator settings they ship load: deploy files cannot drift from the code."""

import shlex
from pathlib import Path

import click
import pytest
import typer.main
import yaml

from fedmla.worker.apps.cli import app
from fedmla.coordinator.settings import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def parse(argv: list[str]) -> None:
    """Parse argv as `fedmla` would, down to the leaf command; raise click.UsageError on drift."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("fedmla", list(argv), resilient_parsing=False)
    while isinstance(cmd, click.Group):
        args = [*ctx._protected_args, *ctx.args] if hasattr(ctx, "_protected_args") else [*ctx.protected_args, *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, args)
        ctx = cmd.make_context(name, rest, parent=ctx)


def compose_commands():
    doc = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    for name, svc in doc["services"].items():
        if "entrypoint" not in svc and "command" in svc:
            yield f"compose:{name}", svc["command"]


def k8s_commands():
    for f in ("coordinator.yaml", "workers.yaml"):
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / f).read_text()):
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []):
                if c.get("command") == ["/bin/sh", "-c"]:
                    line = c["args"][0].replace('"$POD_NAME"', "w-0").replace("$POD_NAME", "w-0")
                    argv = shlex.split(line)
                    yield f"k8s:{f}:{c['name']}", argv[argv.index("fedmla") + 1:]
                elif "args" in c:
                    yield f"k8s:{f}:{c['name']}", c["args"]
    job = yaml.safe_load((DEPLOY / "k8s" / "kuberay-rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    yield "k8s:rayjob", argv[1:]


COMMANDS = list(compose_commands()) + list(k8s_commands())


def test_found_the_commands():
    names = {n for n, _ in COMMANDS}
    assert {"compose:coordinator", "compose:dashboard", "compose:worker-1", "k8s:coordinator.yaml:coordinator",
            "k8s:coordinator.yaml:dashboard", "k8s:workers.yaml:worker", "k8s:rayjob"} <= names


@pytest.mark.parametrize("name,argv", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_command_parses(name, argv):
    parse(argv)


def test_a_drifted_flag_is_caught():
    with pytest.raises(click.UsageError):
        parse(["coordinator", "--dashboard-colour", "red"])


def test_shipped_coordinator_settings_load(tmp_path):
    cm = next(d for d in yaml.safe_load_all((DEPLOY / "k8s" / "coordinator.yaml").read_text()) if d["kind"] == "ConfigMap")
    f = tmp_path / "coordinator.yaml"
    f.write_text(cm["data"]["coordinator.yaml"])
    s = load_settings(f)
    assert s.port == 50051 and str(s.store) == "/data/store" and s.tls_cert is not None
