"""Check that an install resolved the versions fedmla is tested with.

    python deploy/check_versions.py          # after `bash deploy/install.sh`

pyproject.toml declares ranges (torch>=2.6, flwr[simulation]>=1.42,<2) so that fedmla can
join an environment with its own torch; deploy/install.sh puts torch 2.13.0 first where
none is installed. This script fails when the environment holds other versions of the
packages listed in deploy/tested-versions.txt, or when pip, asked to install fedmla
again, would change any of them (a resolver that drifts to another torch or flwr).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent


def expected() -> dict[str, str]:
    out = {}
    for line in (HERE / "tested-versions.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            out[name.strip().lower()] = ver.strip()
    return out


def main() -> int:
    want = expected()
    bad = []
    for name, ver in want.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            bad.append(f"{name}: not installed (tested with {ver})")
            continue
        if have.split("+")[0] != ver:
            bad.append(f"{name}: {have} installed, tested with {ver}")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                            "-e", f"{HERE.parent}[dev]"], capture_output=True, text=True)
        if r.returncode != 0:
            bad.append(f"pip could not resolve fedmla[dev]: {r.stderr.strip()[-500:]}")
        else:
            would = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                     for i in json.loads(report.read_text()).get("install", [])}
            bad += [f"{n}: a fresh resolve would install {would[n]} (tested with {v})" for n, v in want.items()
                    if n in would]
    if bad:
        print("installed versions differ from the tested ones:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    print("tested versions in place: " + ", ".join(f"{n}=={v}" for n, v in want.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
