"""`python -m arm_telemetry [serve|migrate]` — run the telemetry service on its own. Needs
ARM_REGISTRY_ADDRESS; ARM_SERVICE_API_KEY (a system-tenant admin key) to resolve legacy agent ids
and run backfills; ARM_GOVERNANCE_ADDRESS to feed COST_TICK spend into budgets."""

from __future__ import annotations

from arm_common import cli
from arm_telemetry import app

COMMANDS = cli.ServiceCommands("telemetry", app.database, app.migrate, app.TelemetryComponent)

if __name__ == "__main__":
    cli.run(COMMANDS)
