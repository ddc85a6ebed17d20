"""Every view of the console, in nav order. Each is its own module (`views/<slug>.py`, exposing
`VIEW`) with its templates in `templates/<slug>/`; adding one is a module, a folder and a line
here."""

from __future__ import annotations

from arm_console.view import View
from arm_console.views import approvals, audit, controls, deployments, directory, policies, telemetry

VIEWS: list[View] = [
    directory.VIEW,
    policies.VIEW,
    approvals.VIEW,
    deployments.VIEW,
    audit.VIEW,
    telemetry.VIEW,
    controls.VIEW,
]
