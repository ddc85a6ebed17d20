"""The image and its locks (issue 14 items 2 and 6): the runtime lock holds everything the
services import and no development tool; the Dockerfile installs only it, pins its base by
digest and runs as a numeric non-root user; docker-compose.yml's one-go key bootstrap is wired
consistently (the step itself is exercised in tests/registry/test_bootstrap_keys.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned exactly"
            pins[_norm(name)] = version
    return pins


def _names(path: Path) -> set[str]:
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            out.add(_norm(re.split(r"[\[<>=!~; ]", line)[0]))
    return out


RUNTIME = _pins(ROOT / "requirements.lock")
DEV = _pins(ROOT / "requirements-dev.lock")
DEV_TOOLS = {"pytest", "pytest-asyncio", "pytest-xdist", "hypothesis", "mypy", "ruff", "import-linter",
             "grpcio-tools", "mypy-protobuf", "kubernetes-validate", "trustme"}

# Imports every module the services run, as in the image: a module of a distribution that is not
# in requirements.lock cannot be imported (so optional imports fall back as they would there, and
# a hard import of a development tool fails). Prints the distributions that were used.
_PROBE = """
import importlib, json, pkgutil, re, sys
from importlib import metadata
preloaded = set(sys.modules)
allowed = set(json.loads(sys.argv[1]))
owners = metadata.packages_distributions()
def outside(top):
    dists = owners.get(top, [])
    return bool(dists) and not any(re.sub(r"[-_.]+", "-", d).lower() in allowed for d in dists)
class OnlyTheRuntimeLock:
    def find_spec(self, name, path=None, target=None):
        if outside(name.partition(".")[0]):
            raise ModuleNotFoundError(f"{name} is not from requirements.lock", name=name)
        return None
sys.meta_path.insert(0, OnlyTheRuntimeLock())
roots = ["arm_common", "arm_client", "arm_registry", "arm_governance", "arm_telemetry", "arm_allinone", "arm_gateway", "arm_console",
         "arm"]
for root in roots:
    pkg = importlib.import_module(root)
    for info in pkgutil.walk_packages(pkg.__path__, root + "."):
        # The SDK's framework adapters are optional extras: they import their framework, which
        # the services' image does not carry.
        if ".migrations" not in info.name and not info.name.startswith("arm_client.adapters"):
            importlib.import_module(info.name)
used = set()
for name in set(sys.modules) - preloaded:
    used.update(owners.get(name.partition(".")[0], []))
print(json.dumps(sorted(used)))
"""


def test_the_services_import_nothing_outside_the_runtime_lock() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(sorted(RUNTIME))], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    used = {_norm(d) for d in json.loads(out.stdout)}
    assert {"grpcio", "sqlalchemy", "asyncpg", "alembic"} <= used  # the probe sees third-party imports
    assert used <= set(RUNTIME)


def test_runtime_and_dev_locks_are_apart() -> None:
    assert set(RUNTIME) & DEV_TOOLS == set()
    assert DEV_TOOLS <= set(DEV)
    assert "-r requirements.lock" in (ROOT / "requirements-dev.lock").read_text().splitlines()
    assert set(RUNTIME) & set(DEV) == set(), "pinned twice: the dev lock includes the runtime lock"
    assert _names(ROOT / "requirements.in") <= set(RUNTIME)
    assert _names(ROOT / "requirements-dev.in") <= set(DEV) | set(RUNTIME)


def test_dockerfile_installs_only_the_runtime_lock_pins_its_base_and_runs_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms and all(re.search(r"@sha256:[0-9a-f]{64}\b", line) for line in froms)
    assert any("requirements.lock" in line for line in lines)
    assert not any("requirements-dev" in line or "requirements.in" in line for line in lines)
    user = [line.split()[1] for line in lines if line.startswith("USER ")][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0


def test_dockerfile_puts_every_source_folder_of_the_makefile_on_the_path() -> None:
    """The image imports what a checkout imports: its PYTHONPATH is the Makefile's SRC_DIRS (the
    console, for one, imports the CLI's policy-file library)."""
    src_dirs = re.search(r"^SRC_DIRS := (.*)$", (ROOT / "Makefile").read_text(), re.M)
    path = re.search(r"PYTHONPATH=(\S+)", (ROOT / "Dockerfile").read_text())
    assert src_dirs is not None and path is not None
    assert path.group(1).split(":") == [f"/app/{d}" for d in src_dirs.group(1).split()]


def test_compose_mints_and_provisions_the_keys_in_one_go() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    keys = services["keys"]
    assert keys["command"][:2] == ["arm_registry", "genkey"]
    minted = set(keys["command"][2:])
    mounts = {s: {v.split(":")[1]: v.split(":")[0] for v in services[s].get("volumes", [])} for s in services}

    def file_on_volume(service: str, path: str) -> str:
        folder = str(Path(path).parent)
        assert folder in mounts[service], f"{service}: nothing mounted at {folder}"
        return mounts[service][folder]

    registry = services["registry"]["environment"]
    assert registry["ARM_BOOTSTRAP_ADMIN_KEY_FILE"] in minted
    for name in ("registry", "governance", "telemetry"):
        env, svc = services[name]["environment"], services[name]
        assert env["ARM_SERVICE_API_KEY_FILE"] in minted
        assert file_on_volume(name, env["ARM_SERVICE_API_KEY_FILE"]) == \
            file_on_volume("keys", env["ARM_SERVICE_API_KEY_FILE"])
        assert svc["depends_on"]["keys" if name == "registry" else "registry"]["condition"] in (
            "service_completed_successfully", "service_healthy")
        assert "ARM_SERVICE_API_KEY" not in env
    # Only the registry sees the admin key.
    admin_volume = file_on_volume("keys", registry["ARM_BOOTSTRAP_ADMIN_KEY_FILE"])
    assert file_on_volume("registry", registry["ARM_BOOTSTRAP_ADMIN_KEY_FILE"]) == admin_volume
    assert [s for s in services if admin_volume in mounts[s].values()] == ["keys", "registry"]
