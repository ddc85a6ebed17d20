"""Audit: not built yet (its page says so)."""

from __future__ import annotations

from arm_console.views.not_built import not_built

VIEW = not_built("audit", "Audit",
                 "Change records filtered by type, actor, target and date range; the chain's verification result; export.")
