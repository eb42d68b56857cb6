"""Width links record how they were made (feature_links.kind: direction or cofiring), and a parent
that survives in the wider SAE while gaining children is labelled persisted_split.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

One nullable column on feature_links (labels are free strings of up to 16 characters, so
persisted_split needs no schema change). Relations stored before it keep kind null; relating the
pair again fills it.
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('feature_links', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('feature_links', schema=None) as batch_op:
        batch_op.drop_column('kind')
