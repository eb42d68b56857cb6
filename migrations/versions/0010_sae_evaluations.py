"""Report cards: one row per `sae-atlas evaluate` of a published SAE.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06

A new table only: `saes` is referenced, never altered.
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('sae_evaluations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('n_tokens', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], name=op.f('fk_sae_evaluations_sae_id_saes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sae_evaluations'))
    )
    with op.batch_alter_table('sae_evaluations', schema=None) as batch_op:
        batch_op.create_index('ix_sae_evaluations_sae_created', ['sae_id', 'created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('sae_evaluations', schema=None) as batch_op:
        batch_op.drop_index('ix_sae_evaluations_sae_created')
    op.drop_table('sae_evaluations')
