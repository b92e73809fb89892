"""Regenerate the Python code for protos/fedmla/v1/*.proto.

    python protos/generate.py          # write *_pb2.py, *_pb2_grpc.py, *_pb2.pyi
    python protos/generate.py --check  # exit 1 if the committed code is stale

Generated imports are rewritten to be package-relative (``from fedmla.protos.fedmla.v1
import types_pb2``) so the generated modules work inside the installed ``fedmla.protos`` package.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # .../protos
SRC = ROOT / "fedmla" / "v1"


def _generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency: pip install -e '.[dev]'
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(p.relative_to(ROOT).as_posix() for p in SRC.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {SRC}")
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc emits `from fedmla.v1 import x_pb2`; make it an absolute import inside
    # the installed `fedmla.protos` package.
    for path in (out_dir / "fedmla" / "v1").glob("*_pb2*.py*"):
        text = path.read_text()
        text = re.sub(r"^from fedmla\.v1 import", "from fedmla.protos.fedmla.v1 import", text, flags=re.M)
        text = re.sub(r"^import fedmla\.v1\.", "import fedmla.protos.fedmla.v1.", text, flags=re.M)
        path.write_text(text)


def _generated_files(base: Path) -> dict[str, bytes]:
    return {
        p.relative_to(base).as_posix(): p.read_bytes()
        for p in (base / "fedmla" / "v1").glob("*_pb2*.py*")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed code differs from a fresh generation")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        _generate(tmp_path)
        fresh = _generated_files(tmp_path)
        if args.check:
            current = _generated_files(ROOT)
            stale = sorted(k for k in fresh.keys() | current.keys() if fresh.get(k) != current.get(k))
            if stale:
                print("generated protobuf code is stale; run `python protos/generate.py`:", file=sys.stderr)
                for name in stale:
                    print(f"  protos/{name}", file=sys.stderr)
                return 1
            print(f"protobuf code up to date ({len(fresh)} files)")
            return 0
        for old in (ROOT / "fedmla" / "v1").glob("*_pb2*.py*"):
            old.unlink()
        for name, data in fresh.items():
            (ROOT / name).write_bytes(data)
        print(f"wrote {len(fresh)} files under {ROOT / 'fedmla' / 'v1'}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
