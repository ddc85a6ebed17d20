"""Deployments: not built yet (its page says so)."""

from __future__ import annotations

from arm_console.views.not_built import not_built

VIEW = not_built("deployments", "Deployments",
                 "Per template and environment: the active version and its history; activate (with the PROD approval when required) and roll back.")
