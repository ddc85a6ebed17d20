"""The command line every service shares: `python -m arm_<service> [serve|migrate|…]`. Serving
checks the schema is at head first; a bad setting or an unmigrated database exits with status 2
and a message naming what to do."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from arm_common import logs, otel, roles
from arm_common.config import ConfigError, ServiceConfig
from arm_common.db import Database, unreachable_at_start
from arm_common.migrations import SchemaNotReady
from arm_common.server import Host, stop_on_signal


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
    narrower_privileges: dict[str, str] = field(default_factory=dict)
    """Tables the application role gets less than full DML on (see arm_common.roles)."""


async def _migrate(cmds: ServiceCommands, config: ServiceConfig, db: Database) -> None:
    """Migrates as the owner (the migrate URL when set), then grants the runtime URL's role its
    privileges when it is another PostgreSQL user."""
    if not config.migrate_database_url:
        await cmds.migrate(db)
        return
    owner_db = cmds.database(dataclasses.replace(config, database_url=config.migrate_database_url))
    try:
        await cmds.migrate(owner_db)
        app_role, owner = roles.url_user(config.database_url), roles.url_user(config.migrate_database_url)
        if owner_db.is_postgres and app_role and app_role != owner:
            await roles.grant_runtime_privileges(owner_db, app_role, cmds.narrower_privileges)
            print(f"{cmds.service}: granted {app_role} the service's privileges")
    finally:
        await owner_db.dispose()


async def _main(cmds: ServiceCommands, command: str) -> int:
    log = logging.getLogger(f"arm_{cmds.service}")
    config = ServiceConfig.from_env(cmds.service)
    db = cmds.database(config)
    try:
        if command == "migrate":
            await _migrate(cmds, config, db)
            print(f"{cmds.service} database migrated to head")
            return 0
        otel.configure(f"arm-{cmds.service}")  # before the component opens its channels
        component = cmds.component(db, config)
        if command in cmds.extra:
            return await cmds.extra[command](component)
        assert component.authenticator is not None
        host = Host([component], component.authenticator, config.listen, service_name=f"arm-{cmds.service}",
                    share_port=config.share_port, tls_settings=config.tls)
        port = await host.start()
        stop = stop_on_signal()  # before the line a supervisor waits for
        log.info("%s serving on %s (port %d)", cmds.service, config.listen, port)
        await host.serve_until_signal(config.shutdown_grace_s, stop)
        return 0
    finally:
        await db.dispose()


def serve_workers(service: str, workers: int) -> int:
    """ARM_WORKERS > 1: runs `workers` copies of `python -m arm_<service> serve`, each with
    ARM_WORKERS=1 and ARM_SHARE_PORT=true, on the one address (the kernel spreads new connections
    among them). SIGTERM and SIGINT go to every worker. When a worker exits on its own the others
    are stopped too and its status is returned (non-zero), so the orchestrator restarts the whole."""
    log = logging.getLogger(f"arm_{service}")
    env = {k: v for k, v in os.environ.items()
           if k not in ("ARM_WORKERS", "ARM_WORKERS_FILE", "ARM_SHARE_PORT", "ARM_SHARE_PORT_FILE")}
    env.update(ARM_WORKERS="1", ARM_SHARE_PORT="true")
    stopping = False
    live: dict[int, subprocess.Popen[bytes]] = {}

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(live):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for _ in range(workers):
        proc = subprocess.Popen([sys.executable, "-m", f"arm_{service}", "serve"], env=env)
        live[proc.pid] = proc
    log.info("%s: %d workers (pids %s) sharing one port", service, workers, " ".join(map(str, live)))
    status = 0
    while live:
        try:
            pid, raw = os.wait()  # reaps any worker; the Popen objects are never polled
        except ChildProcessError:
            break
        if pid not in live:
            continue
        proc = live.pop(pid)
        code = proc.returncode = os.waitstatus_to_exitcode(raw)
        if not stopping:
            log.error("%s worker %d exited with %d: stopping the others", service, pid, code)
            status = code or 1
            forward(signal.SIGTERM, None)
        elif code not in (0, -signal.SIGTERM, -signal.SIGINT):  # stopped before its handlers were set
            status = status or code
    return 128 - status if status < 0 else status  # killed by signal n: 128 + n, as a shell says


def run(cmds: ServiceCommands) -> None:
    logs.configure()
    parser = argparse.ArgumentParser(prog=f"python -m arm_{cmds.service}")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate", *cmds.extra])
    args = parser.parse_args()
    try:
        if args.command == "serve":
            workers = ServiceConfig.from_env(cmds.service).workers
            if workers > 1:
                sys.exit(serve_workers(cmds.service, workers))
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
