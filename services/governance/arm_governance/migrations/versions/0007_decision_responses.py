"""decision responses stored once per result: `decision_responses`, `decisions.response_part`
(issue 16 part 2: a local decision's row keeps only its own response fields)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 20:12:24.400286
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('decision_responses',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant_id', sa.String(length=64), nullable=False),
    sa.Column('response', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_decision_responses'))
    )
    with op.batch_alter_table('decisions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('response_part', sa.String(length=64), nullable=True))


def downgrade() -> None:
    # Every row back to its whole CheckResponse (the shared part, then the row's own fields:
    # protobuf's concatenation is the merge), in Python: SQLite's || would make text of bytes.
    bind = op.get_bind()
    parts: dict[str, bytes] = {r.id: r.response for r in bind.execute(
        sa.text("SELECT id, response FROM decision_responses")).all()}
    rows = bind.execute(sa.text("SELECT id, response, response_part FROM decisions "
                                "WHERE response_part IS NOT NULL")).all()
    for decision_id, response, part in rows:
        bind.execute(sa.text("UPDATE decisions SET response = :r WHERE id = :i"),
                     {"r": parts[part] + response, "i": decision_id})
    with op.batch_alter_table('decisions', schema=None) as batch_op:
        batch_op.drop_column('response_part')
    op.drop_table('decision_responses')
