"""Approvals: not built yet (its page says so)."""

from __future__ import annotations

from arm_console.views.not_built import not_built

VIEW = not_built("approvals", "Approvals",
                 "the inbox of open requests, approve or deny with a reason, two-person progress, live updates, history.")
