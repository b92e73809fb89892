"""Imports run one way: kernels <- mla_model <- protos (the protocol) <- {coordinator, worker}
<- apps (fedmla.worker.apps: the CLI entry, simulate, benchmarks).

Every ``import`` and ``from ... import`` of every module of the installed package is read
(inside functions too, relative imports resolved), so a lazy import cannot slip past.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LAYERS = ["fedmla.kernels", "fedmla.mla_model", "fedmla.protos", "fedmla.coordinator", "fedmla.worker"]
APPS = "fedmla.worker.apps"

# What each part may import from fedmla (besides itself).
ALLOWED = {
    "fedmla.kernels": set(),
    "fedmla.mla_model": {"fedmla.kernels"},
    "fedmla.protos": {"fedmla.kernels", "fedmla.mla_model"},
    "fedmla.coordinator": {"fedmla.kernels", "fedmla.mla_model", "fedmla.protos"},
    "fedmla.worker": {"fedmla.kernels", "fedmla.mla_model", "fedmla.protos"},
    APPS: {"fedmla.kernels", "fedmla.mla_model", "fedmla.protos", "fedmla.coordinator", "fedmla.worker"},
}


def _part(module: str) -> str | None:
    if module == APPS or module.startswith(APPS + "."):
        return APPS
    for top in LAYERS:
        if module == top or module.startswith(top + "."):
            return top
    return None


def _modules() -> list[tuple[str, Path]]:
    out = []
    for top in LAYERS:
        spec = importlib.util.find_spec(top)
        assert spec is not None and spec.submodule_search_locations, f"{top} is not installed as a package"
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join([top, *parts]), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from fedmla.worker import apps` names a submodule too
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names if a.name != "*"]
    return found


MODULES = _modules()


def test_every_part_is_found():
    parts = {_part(m) for m, _ in MODULES}
    assert parts == set(ALLOWED), parts


def test_no_import_runs_against_the_layers():
    wrong = []
    for module, path in MODULES:
        part = _part(module)
        for line, target in _imports(module, path):
            tpart = _part(target)
            if tpart is None or tpart == part:
                continue
            if tpart == APPS and part != APPS:
                wrong.append(f"{module}:{line} imports {target} (apps sit on top; nothing imports them)")
            elif tpart not in ALLOWED[part] and tpart != APPS:
                wrong.append(f"{module}:{line} imports {target}")
    assert not wrong, "imports against kernels <- mla_model <- protos <- {coordinator, worker} <- apps:\n" + "\n".join(wrong)


def test_nothing_of_ours_under_a_generic_top_level_name(tmp_path):
    """Outside the checkout, `import kernels` (Hugging Face's package has that name) and the
    other folder names never find our code: it is only reachable as fedmla.*."""
    code = ("import importlib.util, json\n"
            "out = {}\n"
            "for n in ['coordinator', 'worker', 'kernels', 'mla_model', 'protos']:\n"
            "    s = importlib.util.find_spec(n)\n"
            "    out[n] = None if s is None else (s.origin or str(list(s.submodule_search_locations or [])))\n"
            "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    found = json.loads(r.stdout)
    ours = str(Path(importlib.util.find_spec("fedmla.kernels").submodule_search_locations[0]).parent)
    assert not [n for n, where in found.items() if where and ours in where], found


def test_distribution_installs_one_top_level_name():
    from importlib.metadata import distribution
    dist = distribution("fedmla")
    top = (dist.read_text("top_level.txt") or "").split()
    assert top == ["fedmla"], top
    entry = [e for e in dist.entry_points if e.group == "console_scripts" and e.name == "fedmla"]
    assert entry and entry[0].value.startswith("fedmla."), entry
