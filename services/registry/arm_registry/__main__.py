"""`python -m arm_registry [serve|migrate|bootstrap]` — run the registry service on its own."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from arm_common import logs
from arm_common.config import ConfigError, ServiceConfig
from arm_common.migrations import SchemaNotReady
from arm_common.server import Host
from arm_registry import app

log = logging.getLogger("arm_registry")


async def main(command: str) -> int:
    config = ServiceConfig.from_env("registry")
    db = app.database(config)
    try:
        if command == "migrate":
            await app.migrate(db)
            print("registry database migrated to head")
            return 0
        component = app.RegistryComponent(db, config)
        if command == "bootstrap":
            result = await app.bootstrap(component.store)
            if result.api_key:
                print(f"system tenant {result.tenant_id}; admin API key (shown once): {result.api_key}")
            else:
                print("already bootstrapped; create further keys with AccessService.CreateApiKey")
            return 0
        host = Host([component], component.authenticator, config.listen, service_name="arm-registry")
        port = await host.start()
        log.info("registry serving on %s (port %d)", config.listen, port)
        await host.serve_until_signal(config.shutdown_grace_s)
        return 0
    finally:
        await db.dispose()


def run() -> None:
    logs.configure()
    parser = argparse.ArgumentParser(prog="python -m arm_registry")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate", "bootstrap"])
    args = parser.parse_args()
    try:
        sys.exit(asyncio.run(main(args.command)))
    except (ConfigError, SchemaNotReady) as exc:
        print(f"arm_registry: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
