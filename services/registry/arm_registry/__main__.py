"""`python -m arm_registry [serve|migrate|bootstrap]` — run the registry service on its own."""

from __future__ import annotations

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

if __name__ == "__main__":
    cli.run(COMMANDS)
