"""session keys: api_keys.parent_key_id, the key a session key was made from

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 18:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_key_id', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_api_keys_parent_key_id'), ['parent_key_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_parent_key_id'))
        batch_op.drop_column('parent_key_id')
