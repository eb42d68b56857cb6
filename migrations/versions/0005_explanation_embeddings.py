"""Explanation embeddings (semantic search), embedding scores and trustworthy-score fields.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

- explanations gains embedding_score (AUROC), detection_/fuzzing_uninformative (the judge answered
  the same for every example) and scores (JSON: n, confidence intervals, baselines). Added with a
  plain ALTER TABLE: a batch copy of `explanations` would cascade-delete its judgements on SQLite;
  for the same reason the SQLite downgrade leaves these nullable columns in place.
- explanation_embeddings: one unit-length float32 vector per explanation, per SAE and model.
- PostgreSQL: a GIN index for the keyword search's to_tsvector, and, where the server offers the
  pgvector extension, an `embedding vector` column that semantic search orders by in the database.
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def _columns(table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    have = _columns("explanations")
    for col in (sa.Column('embedding_score', sa.Float(), nullable=True),
                sa.Column('detection_uninformative', sa.Boolean(), nullable=True),
                sa.Column('fuzzing_uninformative', sa.Boolean(), nullable=True),
                sa.Column('scores', sa.JSON(), nullable=True)):
        if col.name not in have:
            op.add_column('explanations', col)  # a plain ALTER TABLE ... ADD COLUMN on both databases

    op.create_table('explanation_embeddings',
    sa.Column('explanation_id', BigId, autoincrement=False, nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('dim', sa.SmallInteger(), nullable=False),
    sa.Column('vector', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['explanation_id'], ['explanations.id'],
                            name=op.f('fk_explanation_embeddings_explanation_id_explanations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], name=op.f('fk_explanation_embeddings_sae_id_saes'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('explanation_id', name=op.f('pk_explanation_embeddings'))
    )
    op.create_index('ix_explanation_embeddings_model_sae', 'explanation_embeddings',
                    ['model', 'sae_id', 'explanation_id'], unique=False)

    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE INDEX IF NOT EXISTS ix_explanations_text_tsv ON explanations "
                   "USING gin (to_tsvector('english', text))")
        available = op.get_bind().exec_driver_sql(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").first()
        if available:
            # Creating an extension may need more rights than the app's role has: then search stays in numpy.
            op.execute("SAVEPOINT pgvector")
            try:
                op.execute("CREATE EXTENSION IF NOT EXISTS vector")
                op.execute("ALTER TABLE explanation_embeddings ADD COLUMN embedding vector")
                op.execute("RELEASE SAVEPOINT pgvector")
            except sa.exc.DBAPIError:
                op.execute("ROLLBACK TO SAVEPOINT pgvector")


def downgrade() -> None:
    op.drop_index('ix_explanation_embeddings_model_sae', table_name='explanation_embeddings')
    op.drop_table('explanation_embeddings')
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_explanations_text_tsv")
        for name in ('scores', 'fuzzing_uninformative', 'detection_uninformative', 'embedding_score'):
            op.drop_column('explanations', name)
