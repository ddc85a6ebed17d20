"""Telemetry: not built yet (its page says so)."""

from __future__ import annotations

from arm_console.views.not_built import not_built

VIEW = not_built("telemetry", "Telemetry",
                 "Events filtered by type, instance, version, project, run and time; a live tail; a run's trace as a timeline with its decisions.")
