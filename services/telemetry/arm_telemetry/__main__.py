"""`python -m arm_telemetry [serve|migrate]` — run the telemetry service on its own. Needs
ARM_REGISTRY_ADDRESS; ARM_SERVICE_API_KEY (a system-tenant admin key) to resolve legacy agent ids
and run backfills; ARM_GOVERNANCE_ADDRESS to feed COST_TICK spend into budgets."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from arm_common import logs
from arm_common.config import ConfigError, ServiceConfig
from arm_common.migrations import SchemaNotReady
from arm_common.server import Host
from arm_telemetry import app

log = logging.getLogger("arm_telemetry")


async def main(command: str) -> int:
    config = ServiceConfig.from_env("telemetry")
    db = app.database(config)
    try:
        if command == "migrate":
            await app.migrate(db)
            print("telemetry database migrated to head")
            return 0
        component = app.TelemetryComponent(db, config)
        assert component.authenticator is not None
        host = Host([component], component.authenticator, config.listen, service_name="arm-telemetry")
        port = await host.start()
        log.info("telemetry serving on %s (port %d)", config.listen, port)
        await host.serve_until_signal(config.shutdown_grace_s)
        return 0
    finally:
        await db.dispose()


def run() -> None:
    logs.configure()
    parser = argparse.ArgumentParser(prog="python -m arm_telemetry")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"])
    args = parser.parse_args()
    try:
        sys.exit(asyncio.run(main(args.command)))
    except (ConfigError, SchemaNotReady) as exc:
        print(f"arm_telemetry: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
