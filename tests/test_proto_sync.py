"""The committed generated code is exactly what grpcio-tools makes from the .proto files."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"


def test_generated_code_matches_proto_sources(tmp_path: Path) -> None:
    sources = sorted(PROTO_ROOT.rglob("*.proto"))
    assert sources, "no .proto files found"
    include = Path(protoc.__file__).parent / "_proto"
    for source in sources:
        relative = source.relative_to(PROTO_ROOT)
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={tmp_path}",
                f"--pyi_out={tmp_path}",
                f"--grpc_python_out={tmp_path}",
                str(relative),
            ]
        )
        assert code == 0, f"protoc failed on {relative}"
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    for name in generated:
        committed = PROTO_ROOT / name
        assert committed.exists(), f"{name} is generated but not committed: run scripts/gen-proto"
        assert committed.read_bytes() == (tmp_path / name).read_bytes(), (
            f"{name} is out of date: run scripts/gen-proto"
        )
    committed_generated = sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*_pb2*.py*"))
    assert committed_generated == generated, "stale generated files without a .proto source"
