"""Attribution graphs: one row per graph, which is also its job in the queue.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07

A new table only.
"""
from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('graphs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('slug', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('set_name', sa.String(length=200), nullable=False),
    sa.Column('set_path', sa.String(length=2000), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('run_after', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('replacement_score', sa.Float(), nullable=True),
    sa.Column('completeness_score', sa.Float(), nullable=True),
    sa.Column('n_nodes', sa.Integer(), nullable=True),
    sa.Column('n_links', sa.Integer(), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('graph', sa.LargeBinary(), nullable=True),
    sa.Column('requested_by', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_graphs')),
    sa.UniqueConstraint('slug', name=op.f('uq_graphs_slug'))
    )
    op.create_index('ix_graphs_claim', 'graphs', ['status', sa.text('priority DESC'), 'id'], unique=False)
    op.create_index('ix_graphs_created_at', 'graphs', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_graphs_created_at', table_name='graphs')
    op.drop_index('ix_graphs_claim', table_name='graphs')
    op.drop_table('graphs')
