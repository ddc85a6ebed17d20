"""The pure engine library (libs/engine/arm_engine) imports nothing from the services, the client,
the CLI, the database or gRPC: checked on the real import graph of a fresh interpreter, next to the
import-linter contract of pyproject.toml (which tests/test_contracts.py runs)."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("arm_registry", "arm_governance", "arm_telemetry", "arm_client", "arm_cli", "grpc",
             "sqlalchemy", "google.protobuf", "arm.")


def test_engine_imports_no_service_database_or_grpc_code() -> None:
    code = ("import json, sys\n"
            "import arm_engine, arm_engine.engine, arm_engine.risk, arm_engine.limits\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded = json.loads(out)
    assert "arm_engine.engine" in loaded  # the probe itself works
    bad = [m for m in loaded if any(m == f or m.startswith(f.rstrip(".") + ".") or m.startswith(f)
                                    for f in FORBIDDEN)]
    assert bad == [], f"arm_engine pulls in {bad}"


def test_import_linter_has_the_engine_contract() -> None:
    import tomllib
    from pathlib import Path

    cfg = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    contracts = cfg["tool"]["importlinter"]["contracts"]
    engine = [c for c in contracts if c.get("source_modules") == ["arm_engine"]]
    assert engine and {"arm_governance", "arm_registry", "arm_telemetry", "arm_common.db"} <= set(
        engine[0]["forbidden_modules"])
