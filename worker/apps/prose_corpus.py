"""Build a prose corpus for ``fedmla bench comm --data`` from text already on this machine.

One client per installed Python distribution: its long description (the README that
the package's ``*.dist-info/METADATA`` carries after the headers: English prose with some
code and change logs). Nothing is downloaded. The largest ``--clients`` descriptions of at
least ``--min-bytes`` bytes are written to ``DEST/<distribution>/README.txt``::

    python -m fedmla.worker.apps.prose_corpus /tmp/prose --clients 16
    fedmla bench comm --quick --data /tmp/prose --json /tmp/comm-prose.json
"""

from __future__ import annotations

import argparse
import re
import site
import sys
from pathlib import Path


def readme_bodies(roots: list[Path], exclude: set[str] = frozenset({"fedmla"})) -> dict[str, bytes]:
    """Distribution name -> METADATA body (UTF-8, non-empty), first root wins."""
    out: dict[str, bytes] = {}
    for root in roots:
        for meta in sorted(root.glob("*.dist-info/METADATA")):
            name = re.sub(r"-[^-]*\.dist-info$", "", meta.parent.name).lower().replace("_", "-")
            if name in out or name in exclude:
                continue
            raw = meta.read_bytes()
            cut = raw.find(b"\n\n")
            body = raw[cut + 2:].strip() if cut >= 0 else b""
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if body:
                out[name] = body
    return out


def build(dest: Path, clients: int = 16, min_bytes: int = 16_000, roots: list[Path] | None = None) -> list[str]:
    """Write the corpus; returns the client names. Raises ValueError when too few fit."""
    roots = roots if roots is not None else [Path(p) for p in site.getsitepackages() + [site.getusersitepackages()]]
    bodies = {n: b for n, b in readme_bodies([r for r in roots if r.is_dir()]).items() if len(b) >= min_bytes}
    if len(bodies) < clients:
        raise ValueError(f"only {len(bodies)} installed distributions have a description of >= {min_bytes} bytes, "
                         f"{clients} clients requested")
    chosen = sorted(sorted(bodies, key=lambda n: (-len(bodies[n]), n))[:clients])
    for name in chosen:
        (dest / name).mkdir(parents=True, exist_ok=True)
        (dest / name / "README.txt").write_bytes(bodies[name] + b"\n")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", type=Path)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--min-bytes", type=int, default=16_000)
    a = p.parse_args(argv)
    try:
        names = build(a.dest, a.clients, a.min_bytes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(names)} clients in {a.dest}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
