"""What the quickstart scripts share: where the dev server is, and the env file `load.py` writes
(`.arm/quickstart.env`: the agent's key and instance, the tenant admin's and the approver's keys)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(os.environ.get("ARM_DATA_DIR", ".arm"))
ENV_FILE = DATA_DIR / "quickstart.env"


def dev_admin_key() -> str:
    key = os.environ.get("ARM_ADMIN_KEY")
    if key:
        return key
    path = DATA_DIR / "dev-admin-key"
    if not path.exists():
        raise SystemExit(f"no {path}: start the dev server first (`make run`)")
    return path.read_text().strip()


def write_env(values: dict[str, str]) -> None:
    ENV_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds keys
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in values.items())


def load_env() -> dict[str, str]:
    """The env file's values, set in os.environ for the SDK to read."""
    if not ENV_FILE.exists():
        raise SystemExit(f"no {ENV_FILE}: run `python examples/quickstart/load.py` first")
    values = dict(line.split("=", 1) for line in ENV_FILE.read_text().splitlines() if "=" in line)
    os.environ.update(values)
    return values
