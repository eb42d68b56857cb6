"""Stored contrastive searches (the permalink of /contrast/{id}).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('contrast_queries',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('lm_name', sa.String(length=200), nullable=False),
    sa.Column('label_a', sa.String(length=100), nullable=False),
    sa.Column('label_b', sa.String(length=100), nullable=False),
    sa.Column('n_a', sa.Integer(), nullable=False),
    sa.Column('n_b', sa.Integer(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('texts', sa.LargeBinary(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('requested_by', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_contrast_queries'))
    )
    with op.batch_alter_table('contrast_queries', schema=None) as batch_op:
        batch_op.create_index('ix_contrast_queries_created_at', ['created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('contrast_queries', schema=None) as batch_op:
        batch_op.drop_index('ix_contrast_queries_created_at')
    op.drop_table('contrast_queries')
