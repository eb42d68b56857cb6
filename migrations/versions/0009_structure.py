"""The shape of an SAE: each latent's co-firing partners and place on the map, the map's
clusters, and multi-dimensional feature groups.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

New tables only: `saes` and `features` are referenced, never altered.
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('latent_structure',
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('latent_index', sa.Integer(), nullable=False),
    sa.Column('x', sa.Float(), nullable=True),
    sa.Column('y', sa.Float(), nullable=True),
    sa.Column('cluster', sa.Integer(), nullable=True),
    sa.Column('partners', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], name=op.f('fk_latent_structure_sae_id_saes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('sae_id', 'latent_index', name=op.f('pk_latent_structure'))
    )
    op.create_table('sae_maps',
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('clusters', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], name=op.f('fk_sae_maps_sae_id_saes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('sae_id', name=op.f('pk_sae_maps'))
    )
    op.create_table('feature_groups',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('latents', sa.JSON(), nullable=False),
    sa.Column('n_tokens', sa.Integer(), nullable=False),
    sa.Column('separability', sa.Float(), nullable=False),
    sa.Column('mixture', sa.Float(), nullable=False),
    sa.Column('circle_residual', sa.Float(), nullable=False),
    sa.Column('variance_share', sa.JSON(), nullable=False),
    sa.Column('scatter', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], name=op.f('fk_feature_groups_sae_id_saes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_feature_groups')),
    sa.UniqueConstraint('sae_id', 'rank', name='uq_feature_groups_sae_id')
    )


def downgrade() -> None:
    op.drop_table('feature_groups')
    op.drop_table('sae_maps')
    op.drop_table('latent_structure')
