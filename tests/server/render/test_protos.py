"""The committed generated gRPC modules match render.proto (a stale render_pb2*.py fails here)."""
from __future__ import annotations

import re
from pathlib import Path

from megaportrait.protos import generate

# Lines that name the generator's own version: they differ between grpcio-tools releases, not between protos.
_VERSION_LINES = re.compile(r"^.*(GRPC_GENERATED_VERSION = |Protobuf Python Version:|_runtime_version\.ValidateProtobufRuntimeVersion|^\s+\d+,$|^\s+'',$).*$", re.M)


def _normalised(text: str) -> str:
    return _VERSION_LINES.sub("", text)


def test_generated_modules_are_in_sync_with_the_proto(tmp_path):
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == {"render_pb2.py", "render_pb2_grpc.py"}
    for fresh in written:
        committed = generate.PROTO_DIR / fresh.name
        assert committed.is_file(), f"{committed} missing: run python -m megaportrait.protos.generate"
        assert _normalised(fresh.read_text()) == _normalised(committed.read_text()), (
            f"{committed.name} is stale: run `python -m megaportrait.protos.generate` and commit the result"
        )


def test_generated_code_imports_through_the_package():
    from megaportrait.protos import render_pb2, render_pb2_grpc

    text = Path(render_pb2_grpc.__file__).read_text()
    assert "from megaportrait.protos import render_pb2 as" in text
    assert render_pb2.DESCRIPTOR.package == "megaportrait.render.v1"
    service = render_pb2.DESCRIPTOR.services_by_name["RenderNode"]
    assert {m.name for m in service.methods} == {
        "GetNodeInfo", "SubmitJob", "GetJob", "StreamProgress", "FetchResult", "CancelJob", "DeleteJobs", "DeletePerson",
    }
    assert service.methods_by_name["StreamProgress"].server_streaming
