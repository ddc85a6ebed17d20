"""The contracts and the code's architecture rules, checked on every test run."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tree_diff(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    out = [f"only in generated: {n}" for n in cmp.left_only] + [f"only committed: {n}" for n in cmp.right_only]
    out += [f"differs: {n}" for n in cmp.diff_files]
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    out += [f"differs: {n}" for n in mismatch + errors if f"differs: {n}" not in out]
    for sub in cmp.common_dirs:
        out += [f"{sub}/{line}" for line in _tree_diff(a / sub, b / sub)]
    return out


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    """libs/proto must be exactly what scripts/gen_protos.py makes from proto/."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)],
                   check=True, capture_output=True)
    diff = _tree_diff(tmp_path / "arm", ROOT / "libs" / "proto" / "arm")
    assert not diff, "generated code is stale; run `make proto`:\n" + "\n".join(diff)


def test_buf_lint_passes() -> None:
    buf = ROOT / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        pytest.fail("buf is not installed; `make setup` installs it with npm ci")
    result = subprocess.run([str(buf), "lint"], cwd=ROOT / "proto", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_services_never_import_each_other() -> None:
    """import-linter contracts in pyproject.toml: services are independent; arm_common and
    arm_client import no service."""
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports, "import-linter is not installed in the venv"
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and "0 broken" in result.stdout
