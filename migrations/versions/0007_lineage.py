"""Relations between SAEs (layer, width and seed pairs) with their latent links, and what each
SAE misses (dark matter).

Revision ID: 0007
Revises: 0003
Create Date: 2026-11-26

New tables only: `saes` is referenced, never altered (a batch migration of `saes` on SQLite would
cascade-delete its features, see 0003).
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('sae_relations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sae_a_id', sa.Integer(), nullable=False),
    sa.Column('sae_b_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('n_tokens', sa.BigInteger(), nullable=False),
    sa.Column('summary', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['sae_a_id'], ['saes.id'], name=op.f('fk_sae_relations_sae_a_id_saes'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['sae_b_id'], ['saes.id'], name=op.f('fk_sae_relations_sae_b_id_saes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sae_relations')),
    sa.UniqueConstraint('sae_a_id', 'sae_b_id', name='uq_sae_relations_sae_a_id')
    )
    with op.batch_alter_table('sae_relations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sae_relations_sae_b_id'), ['sae_b_id'], unique=False)

    op.create_table('feature_links',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('relation_id', sa.Integer(), nullable=False),
    sa.Column('a_index', sa.Integer(), nullable=True),
    sa.Column('b_index', sa.Integer(), nullable=True),
    sa.Column('label', sa.String(length=16), nullable=False),
    sa.Column('cos', sa.Float(), nullable=True),
    sa.Column('rho', sa.Float(), nullable=True),
    sa.Column('p_b_given_a', sa.Float(), nullable=True),
    sa.Column('p_a_given_b', sa.Float(), nullable=True),
    sa.Column('stitch_gain', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['relation_id'], ['sae_relations.id'], name=op.f('fk_feature_links_relation_id_sae_relations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_feature_links'))
    )
    with op.batch_alter_table('feature_links', schema=None) as batch_op:
        batch_op.create_index('ix_feature_links_relation_a', ['relation_id', 'a_index'], unique=False)
        batch_op.create_index('ix_feature_links_relation_b', ['relation_id', 'b_index'], unique=False)
        batch_op.create_index('ix_feature_links_relation_label', ['relation_id', 'label'], unique=False)

    op.create_table('sae_dark_matter',
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], name=op.f('fk_sae_dark_matter_sae_id_saes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('sae_id', name=op.f('pk_sae_dark_matter'))
    )


def downgrade() -> None:
    op.drop_table('sae_dark_matter')
    with op.batch_alter_table('feature_links', schema=None) as batch_op:
        batch_op.drop_index('ix_feature_links_relation_label')
        batch_op.drop_index('ix_feature_links_relation_b')
        batch_op.drop_index('ix_feature_links_relation_a')
    op.drop_table('feature_links')
    with op.batch_alter_table('sae_relations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_sae_relations_sae_b_id'))
    op.drop_table('sae_relations')
