"""Alembic environment of the registry database."""

from arm_common.migrations import run_env
from arm_registry.models import Base

run_env(Base.metadata)
