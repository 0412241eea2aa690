"""cached_tokens on items and jobs: prompt tokens taken from a shared prefix

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from alembic import op
import sqlalchemy as sa


revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cached_tokens", sa.Integer(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        # Existing jobs shared nothing: 0, and NOT NULL like the other counters.
        batch_op.add_column(sa.Column("cached_tokens", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("cached_tokens", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("cached_tokens")
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_column("cached_tokens")
