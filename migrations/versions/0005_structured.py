"""items: logprobs and extra choices (issue 10: logprobs, n)

Revision ID: 0005
Revises: 0001
Create Date: 2026-11-27
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('items') as batch:
        batch.add_column(sa.Column('logprobs', sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column('choices', sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('items') as batch:
        batch.drop_column('choices')
        batch.drop_column('logprobs')
