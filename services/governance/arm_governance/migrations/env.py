"""Alembic environment of the governance database."""

from arm_common.migrations import run_env
from arm_governance.models import Base

run_env(Base.metadata)
