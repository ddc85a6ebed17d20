"""Regenerate the committed Python code for proto/ into libs/proto (or another folder).

Usage: python scripts/gen_protos.py [OUT_DIR]
The generated *_pb2.py, *_pb2_grpc.py and .pyi stubs are committed and never edited by hand;
tests/test_generated_protos.py fails when they are out of date.
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> None:
    # ARM's own contracts; proto/google holds vendored imports (field_behavior.proto), whose Python
    # code comes from googleapis-common-protos.
    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "arm").rglob("*.proto"))
    generated = out_dir / "arm"
    if generated.exists():
        shutil.rmtree(generated)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    # Regular packages (not namespace packages) so tools and editors resolve them everywhere.
    for folder in [generated, *(p for p in generated.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "libs" / "proto")
