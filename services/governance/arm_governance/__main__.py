"""`python -m arm_governance [serve|migrate]` — run the governance service on its own. Needs
ARM_REGISTRY_ADDRESS, and ARM_SERVICE_API_KEY (a system-tenant admin key) to cache agent
resolutions."""

from __future__ import annotations

from arm_common import cli
from arm_governance import app

COMMANDS = cli.ServiceCommands("governance", app.database, app.migrate, app.GovernanceComponent,
                               narrower_privileges=app.RUNTIME_PRIVILEGES)

if __name__ == "__main__":
    cli.run(COMMANDS)
