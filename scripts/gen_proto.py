"""Regenerate the Python stubs in ps_common/proto/ from proto/*.proto.

Run with --check to fail (exit 1) when the committed stubs differ from what
proto/ generates, as `make check` and the test suite do.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
# The virtual path makes protoc write `from ps_common.proto import ps_pb2`
# in the generated gRPC module, so the stubs import as a normal package.
PACKAGE_DIR = "ps_common/proto"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_DIR}={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *[f"{PACKAGE_DIR}/{p.name}" for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / PACKAGE_DIR).glob("*_pb2*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        target = ROOT / PACKAGE_DIR
        stale = [
            f.name
            for f in fresh
            if not (target / f.name).exists() or not filecmp.cmp(f, target / f.name, shallow=False)
        ]
        if args.check:
            if stale:
                print(f"generated stubs are out of date: {stale}; run `make proto`", file=sys.stderr)
                return 1
            return 0
        for f in fresh:
            (target / f.name).write_bytes(f.read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
