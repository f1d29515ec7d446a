"""Regenerate render_pb2.py and render_pb2_grpc.py from render.proto: `python -m megaportrait.protos.generate`.

grpcio-tools writes `import render_pb2`; the generated gRPC module is rewritten to import through the package so
`from megaportrait.protos import render_pb2_grpc` works from anywhere.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("render.proto",)


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Write the generated modules for every proto in `PROTOS` into `out_dir`; return their paths."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir = Path(out_dir)
    written: list[Path] = []
    for proto in PROTOS:
        # protoc's output depends on the working tree only through these arguments: keep them stable.
        with tempfile.TemporaryDirectory() as tmp:
            rc = protoc.main(
                ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", proto]
            )
            if rc != 0:
                raise RuntimeError(f"protoc failed on {proto} (exit {rc})")
            stem = proto.removesuffix(".proto")
            for name in (f"{stem}_pb2.py", f"{stem}_pb2_grpc.py"):
                text = (Path(tmp) / name).read_text()
                text = re.sub(rf"^import {stem}_pb2 as", f"from megaportrait.protos import {stem}_pb2 as", text, flags=re.M)
                target = out_dir / name
                target.write_text(text)
                written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
