#!/usr/bin/env python3
"""Generate the Python stubs of the rlhf.v1 API into services/rlhf/v1/.

    python protos/generate.py            # regenerate in place
    python protos/generate.py --out DIR  # generate elsewhere (the freshness test compares the two)

Needs grpcio-tools (the `test` extra pins the version whose output is committed). Never edit the outputs by hand.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "services"


def proto_files() -> list[pathlib.Path]:
    return sorted((PROTO_ROOT / "rlhf" / "v1").glob("*.proto"))


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc on every proto of rlhf.v1; return the files written under out_root/rlhf/v1."""
    import grpc_tools
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"  # well-known types (timestamp.proto)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    pkg = out_root / "rlhf" / "v1"
    init = pkg / "__init__.py"
    init.write_text('"""Generated stubs of the rlhf.v1 API (protos/generate.py). Do not edit."""\n')
    return sorted(p for p in pkg.iterdir() if p.suffix in {".py", ".pyi"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="root to write rlhf/v1/ under")
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
