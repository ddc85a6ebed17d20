"""The command line every service shares: `python -m arm_<service> [serve|migrate|…]`. Serving
checks the schema is at head first; a bad setting or an unmigrated database exits with status 2
and a message naming what to do."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from arm_common import logs, otel
from arm_common.config import ConfigError, ServiceConfig
from arm_common.db import Database, unreachable_at_start
from arm_common.migrations import SchemaNotReady
from arm_common.server import Host


@dataclass(frozen=True)
class ServiceCommands:
    """How one service is opened, migrated and built into a host component."""

    service: str
    """registry, governance or telemetry."""
    database: Callable[[ServiceConfig], Database]
    """Opens the service's database from its config."""
    migrate: Callable[[Database], Awaitable[None]]
    """Migrates it to head (the `migrate` command)."""
    component: Callable[[Database, ServiceConfig], Any]
    """Builds the component a Host serves (it has an `authenticator`)."""
    extra: dict[str, Callable[[Any], Awaitable[int]]] = field(default_factory=dict)
    """Further commands, given the component, returning the exit status (e.g. `bootstrap`)."""


async def _main(cmds: ServiceCommands, command: str) -> int:
    log = logging.getLogger(f"arm_{cmds.service}")
    config = ServiceConfig.from_env(cmds.service)
    db = cmds.database(config)
    try:
        if command == "migrate":
            await cmds.migrate(db)
            print(f"{cmds.service} database migrated to head")
            return 0
        otel.configure(f"arm-{cmds.service}")  # before the component opens its channels
        component = cmds.component(db, config)
        if command in cmds.extra:
            return await cmds.extra[command](component)
        assert component.authenticator is not None
        host = Host([component], component.authenticator, config.listen, service_name=f"arm-{cmds.service}",
                    share_port=config.share_port)
        port = await host.start()
        log.info("%s serving on %s (port %d)", cmds.service, config.listen, port)
        await host.serve_until_signal(config.shutdown_grace_s)
        return 0
    finally:
        await db.dispose()


def run(cmds: ServiceCommands) -> None:
    logs.configure()
    parser = argparse.ArgumentParser(prog=f"python -m arm_{cmds.service}")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate", *cmds.extra])
    args = parser.parse_args()
    try:
        sys.exit(asyncio.run(_main(cmds, args.command)))
    except (ConfigError, SchemaNotReady) as exc:
        print(f"arm_{cmds.service}: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        message = unreachable_at_start(exc, cmds.service)
        if message is None:
            raise
        print(f"arm_{cmds.service}: {message}", file=sys.stderr)
        sys.exit(2)
