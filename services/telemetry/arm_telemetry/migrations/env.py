"""Alembic environment of the telemetry database."""

from arm_common.migrations import run_env
from arm_telemetry.models import metadata

run_env(metadata)
