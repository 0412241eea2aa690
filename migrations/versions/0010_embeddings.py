"""embedding jobs (issue 21): a job's task, and each item's vectors as binary float32

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa


revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        # Every existing job generates text.
        batch_op.add_column(sa.Column("task", sa.String(16), nullable=False, server_default="generate"))
    with op.batch_alter_table("items", schema=None) as batch_op:
        # The line's vectors, one per input, float32 little-endian, back to back: 4 bytes a dimension.
        batch_op.add_column(sa.Column("embedding", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("embedding_dim", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_column("embedding_dim")
        batch_op.drop_column("embedding")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("task")
