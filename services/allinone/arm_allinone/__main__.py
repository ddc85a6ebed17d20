"""`python -m arm_allinone` (what `make run` starts): migrates the SQLite databases, bootstraps
the system tenant on first start, prints the address and the admin key, and serves, with the web
console beside it (`ARM_CONSOLE_LISTEN`, default 127.0.0.1:8080; `off` leaves it out)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from pathlib import Path

from arm_client.connection import Settings
from arm_common import logs, otel
from arm_common.config import ConfigError, ServiceConfig
from arm_common.event_feed import OpEventForwarder
from arm_common.server import Host, stop_on_signal
from arm_console.config import ConsoleConfig
from arm_console.server import ConsoleServer
from arm_governance import app as governance_app
from arm_governance.webhooks.egress import LOOPBACK
from arm_registry import app as registry_app
from arm_telemetry import app as telemetry_app

log = logging.getLogger("arm_allinone")


def write_key_file(path: Path, key: str) -> None:
    """Writes the admin key readable by its owner only (0600), never briefly wider."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(path, 0o600)


async def main() -> int:
    config = ServiceConfig.from_env("allinone")
    if config.workers > 1:
        raise ConfigError("ARM_WORKERS > 1 is for the standalone services; the dev server runs one process")
    if config.tls.serves_tls != config.tls.dials_tls:  # its services call each other through its port
        raise ConfigError("the all-in-one server needs ARM_TLS_CERT_FILE, ARM_TLS_KEY_FILE and ARM_TLS_CA_FILE "
                          "together (or none): its services call each other through its own port")
    otel.configure("arm-allinone")  # before the components open their channels
    registry_config = ServiceConfig.from_env("registry")
    # One process, one port: the registry shares the all-in-one address.
    registry_db = registry_app.database(registry_config)
    governance_db = governance_app.database(ServiceConfig.from_env("governance"))
    telemetry_db = telemetry_app.database(ServiceConfig.from_env("telemetry"))
    try:
        await registry_app.migrate(registry_db)
        await governance_app.migrate(governance_db)
        await telemetry_app.migrate(telemetry_db)
        key_file = Path(config.data_dir) / "dev-admin-key"
        boot = await registry_app.bootstrap(registry_app.RegistryStore(registry_db, None, None),
                                            new_key_if_exists=not key_file.exists())
        if boot.api_key:
            write_key_file(key_file, boot.api_key)
        admin_key = key_file.read_text().strip()
        # The registry delivers its change records to the governance in this same process.
        registry = registry_app.RegistryComponent(
            registry_db, dataclasses.replace(registry_config, service_api_key=admin_key),
            in_process_governance=True)
        # In one process the system admin's key doubles as the service key governance uses to
        # follow the registry's agent changes.
        governance_config = dataclasses.replace(ServiceConfig.from_env("governance"),
                                                service_api_key=admin_key)
        if not os.environ.get("ARM_WEBHOOK_ALLOWED_NETWORKS"):
            # A development server: webhooks may reach a receiver on this machine.
            governance_config = dataclasses.replace(governance_config, webhook_allowed_networks=LOOPBACK)
        # Governance's opEvents go to the telemetry hosted here, once the address is known.
        op_events = OpEventForwarder(None, admin_key, config.tls)
        governance = governance_app.GovernanceComponent(governance_db, governance_config,
                                                        in_process_registry=True, op_events=op_events)
        governance.stream_authenticator = registry.authenticator
        telemetry = telemetry_app.TelemetryComponent(
            telemetry_db, dataclasses.replace(ServiceConfig.from_env("telemetry"), service_api_key=admin_key),
            in_process_registry=True, in_process_governance=True)
        host = Host([registry, governance, telemetry], registry.authenticator, config.listen,
                    service_name="arm-allinone", share_port=config.share_port, tls_settings=config.tls)
        port = await host.start()
        stop = stop_on_signal()  # before the lines a supervisor waits for
        address = f"{config.listen.rpartition(':')[0]}:{port}"
        op_events.address = address
        print(f"ARM dev server listening on {address}", flush=True)
        print(f"admin API key: {admin_key}  (also in {key_file})", flush=True)
        print("services: registry, governance, telemetry", flush=True)
        console = None
        if os.environ.get("ARM_CONSOLE_LISTEN", "").lower() != "off":
            # The web console beside it, calling this server's port with each signed-in user's key.
            console = ConsoleServer(ConsoleConfig.from_env(services=Settings.from_env(address=address)))
            await console.start()
            print(f"web console: {console.url}  (sign in with an operator API key, e.g. the admin key above)",
                  flush=True)
        try:
            await host.serve_until_signal(config.shutdown_grace_s, stop)
        finally:
            if console is not None:
                await console.stop()
        return 0
    finally:
        await registry_db.dispose()
        await governance_db.dispose()
        await telemetry_db.dispose()


def run() -> None:
    logs.configure()
    try:
        sys.exit(asyncio.run(main()))
    except ConfigError as exc:
        print(f"arm_allinone: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
