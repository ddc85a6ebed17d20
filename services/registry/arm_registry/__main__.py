"""`python -m arm_registry [serve|migrate|bootstrap|genkey]` — run the registry service on its own.
`genkey [PATH...]` mints a fresh API key (nothing stored) for ARM_BOOTSTRAP_ADMIN_KEY_FILE or
ARM_SERVICE_API_KEY_FILE, which the registry provisions on start."""

from __future__ import annotations

import os
import sys
from typing import Any

from arm_common import cli
from arm_registry import app


async def bootstrap(component: Any) -> int:
    result = await app.bootstrap(component.store)
    if result.api_key:
        print(f"system tenant {result.tenant_id}; admin API key (shown once): {result.api_key}")
    else:
        print("already bootstrapped; create further keys with AccessService.CreateApiKey")
    return 0


COMMANDS = cli.ServiceCommands("registry", app.database, app.migrate, app.RegistryComponent,
                               extra={"bootstrap": bootstrap})

def genkey(paths: list[str]) -> int:
    """`genkey` prints a fresh key; `genkey PATH...` writes one to each PATH that does not exist
    yet (mode 0600, never overwriting: a re-run keeps the keys already provisioned)."""
    if not paths:
        print(app.genkey())
        return 0
    for path in paths:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            print(f"{path}: exists, kept")
            continue
        with os.fdopen(fd, "w") as f:
            f.write(app.genkey() + "\n")
        print(f"{path}: new key written")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["genkey"]:  # needs no database nor configuration
        sys.exit(genkey(sys.argv[2:]))
    cli.run(COMMANDS)
