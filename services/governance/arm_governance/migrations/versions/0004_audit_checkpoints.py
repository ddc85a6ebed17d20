"""audit checkpoints: signed chain heads, append-only on PostgreSQL

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 12:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

import arm_common.tables

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

APPEND_ONLY_FUNCTION = """
CREATE FUNCTION audit_checkpoints_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_checkpoints is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""


def upgrade() -> None:
    op.create_table('audit_checkpoints',
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('sequence', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('key_id', sa.String(length=16), nullable=False),
    sa.Column('head_hash', sa.String(length=64), nullable=False),
    sa.Column('sign_time', arm_common.tables.UtcDateTime(), nullable=False),
    sa.Column('signature', sa.LargeBinary(), nullable=False),
    sa.Column('tree_root', sa.String(length=64), nullable=False),
    sa.Column('tree_state', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('tenant_id', 'sequence', 'key_id', name=op.f('pk_audit_checkpoints'))
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(APPEND_ONLY_FUNCTION)
        op.execute("CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints "
                   "FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_append_only()")
        op.execute("CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints "
                   "FOR EACH STATEMENT EXECUTE FUNCTION audit_checkpoints_append_only()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_checkpoints_no_truncate ON audit_checkpoints")
        op.execute("DROP TRIGGER IF EXISTS audit_checkpoints_append_only ON audit_checkpoints")
        op.execute("DROP FUNCTION IF EXISTS audit_checkpoints_append_only()")
    op.drop_table('audit_checkpoints')
