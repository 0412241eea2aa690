"""Stored sizes of a batch's output and error files (issue 20)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa


revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("output_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("error_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("sized_for", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("sized_for")
        batch_op.drop_column("error_bytes")
        batch_op.drop_column("output_bytes")
