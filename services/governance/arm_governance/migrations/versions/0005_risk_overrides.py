"""risk overrides: a tenant's own risk classification entries (issue 12, item 3)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 13:28:00.000000
"""

import sqlalchemy as sa
from alembic import op

import arm_common.tables

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('risk_overrides',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('updated_at', arm_common.tables.UtcDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('tenant_id', name=op.f('pk_risk_overrides'))
    )


def downgrade() -> None:
    op.drop_table('risk_overrides')
