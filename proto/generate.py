"""Generate the Python gRPC code for every .proto under proto/ (run by setup.py's build hook, or by hand:
`python proto/generate.py`). The output sits next to each .proto and is never committed or edited."""

from pathlib import Path

HERE = Path(__file__).parent


def main(out: Path = HERE) -> list[Path]:
    """Run protoc on every .proto, writing beside it (or under `out`); returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    outputs = []
    for proto in sorted(HERE.rglob("*.proto")):
        rel = proto.relative_to(HERE)
        args = [
            "protoc",
            f"-I{HERE}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(rel),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {rel}")
        stem = out / rel.with_suffix("")
        outputs += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2.pyi"), Path(f"{stem}_pb2_grpc.py")]
    return outputs


if __name__ == "__main__":
    for path in main():
        print(path)
