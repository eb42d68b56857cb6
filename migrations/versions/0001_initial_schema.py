"""Initial schema: LMs, SAEs, features, examples, explanations, judgements, jobs, API keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-24

Explanation search is dialect-specific: an FTS5 table kept in sync by triggers on SQLite, a GIN
index over to_tsvector('english', text) on PostgreSQL.
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash')),
    sa.UniqueConstraint('name', name=op.f('uq_api_keys_name'))
    )
    op.create_table('lms',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('source', sa.String(length=1000), nullable=False),
    sa.Column('architecture', sa.String(length=100), nullable=False),
    sa.Column('n_layers', sa.Integer(), nullable=False),
    sa.Column('d_model', sa.Integer(), nullable=False),
    sa.Column('vocab_size', sa.Integer(), nullable=False),
    sa.Column('bos_token_id', sa.Integer(), nullable=True),
    sa.Column('vocab', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_lms')),
    sa.UniqueConstraint('name', name=op.f('uq_lms_name'))
    )
    op.create_table('saes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('lm_id', sa.Integer(), nullable=False),
    sa.Column('site', sa.String(length=100), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=True),
    sa.Column('architecture', sa.String(length=50), nullable=False),
    sa.Column('d_in', sa.Integer(), nullable=False),
    sa.Column('d_sae', sa.Integer(), nullable=False),
    sa.Column('k', sa.Integer(), nullable=True),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('norm_scale', sa.Float(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('charts', sa.JSON(), nullable=False),
    sa.Column('weights_path', sa.String(length=2000), nullable=True),
    sa.Column('n_tokens_analyzed', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('version', sa.String(length=40), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['lm_id'], ['lms.id'], name=op.f('fk_saes_lm_id_lms'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_saes')),
    sa.UniqueConstraint('name', name=op.f('uq_saes_name'))
    )
    with op.batch_alter_table('saes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_saes_lm_id'), ['lm_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_saes_status'), ['status'], unique=False)

    op.create_table('features',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('firing_count', sa.BigInteger(), nullable=False),
    sa.Column('density', sa.Float(), nullable=False),
    sa.Column('mean_act', sa.Float(), nullable=False),
    sa.Column('max_act', sa.Float(), nullable=False),
    sa.Column('moments', sa.JSON(), nullable=False),
    sa.Column('act_hist', sa.JSON(), nullable=False),
    sa.Column('interval_shares', sa.JSON(), nullable=False),
    sa.Column('logits', sa.JSON(), nullable=False),
    sa.Column('neighbors', sa.JSON(), nullable=False),
    sa.Column('peak_token_id', sa.Integer(), nullable=True),
    sa.Column('peak_token_share', sa.Float(), nullable=False),
    sa.Column('best_score', sa.Float(), nullable=True),
    sa.Column('explanation', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], name=op.f('fk_features_sae_id_saes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_features')),
    sa.UniqueConstraint('sae_id', 'index', name='uq_features_sae_id_index')
    )
    with op.batch_alter_table('features', schema=None) as batch_op:
        batch_op.create_index('ix_features_sae_density', ['sae_id', 'density'], unique=False)
        batch_op.create_index('ix_features_sae_max_act', ['sae_id', 'max_act'], unique=False)
        batch_op.create_index('ix_features_sae_peak_token', ['sae_id', 'peak_token_id'], unique=False)
        batch_op.create_index('ix_features_sae_score', ['sae_id', 'best_score'], unique=False)

    op.create_table('examples',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('feature_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.SmallInteger(), nullable=False),
    sa.Column('rank', sa.SmallInteger(), nullable=False),
    sa.Column('interval', sa.SmallInteger(), nullable=True),
    sa.Column('activation', sa.Float(), nullable=False),
    sa.Column('peak', sa.SmallInteger(), nullable=False),
    sa.Column('doc_id', sa.Integer(), nullable=False),
    sa.Column('doc_offset', sa.Integer(), nullable=False),
    sa.Column('token_ids', sa.LargeBinary(), nullable=False),
    sa.Column('acts', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['feature_id'], ['features.id'], name=op.f('fk_examples_feature_id_features'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_examples'))
    )
    with op.batch_alter_table('examples', schema=None) as batch_op:
        batch_op.create_index('ix_examples_feature_kind_rank', ['feature_id', 'kind', 'rank'], unique=False)

    op.create_table('explanations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('feature_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('method', sa.String(length=50), nullable=False),
    sa.Column('explainer', sa.String(length=200), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=True),
    sa.Column('raw_response', sa.Text(), nullable=True),
    sa.Column('detection_score', sa.Float(), nullable=True),
    sa.Column('detection_f1', sa.Float(), nullable=True),
    sa.Column('fuzzing_score', sa.Float(), nullable=True),
    sa.Column('fuzzing_f1', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['feature_id'], ['features.id'], name=op.f('fk_explanations_feature_id_features'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_explanations'))
    )
    with op.batch_alter_table('explanations', schema=None) as batch_op:
        batch_op.create_index('ix_explanations_feature', ['feature_id'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('feature_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('run_after', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('requested_by', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['feature_id'], ['features.id'], name=op.f('fk_jobs_feature_id_features'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], name=op.f('fk_jobs_sae_id_saes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_claim', ['status', 'priority', 'run_after', 'id'], unique=False)
        batch_op.create_index('ix_jobs_sae_status', ['sae_id', 'status'], unique=False)
        batch_op.create_index('uq_jobs_live_feature_kind', ['feature_id', 'kind'], unique=True, sqlite_where=sa.text("status IN ('queued', 'running')"), postgresql_where=sa.text("status IN ('queued', 'running')"))

    op.create_table('judgements',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('explanation_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('method', sa.String(length=20), nullable=False),
    sa.Column('example_id', sa.BigInteger(), nullable=True),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('truth', sa.Boolean(), nullable=False),
    sa.Column('prediction', sa.Boolean(), nullable=True),
    sa.Column('correct', sa.Boolean(), nullable=False),
    sa.Column('raw', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['explanation_id'], ['explanations.id'], name=op.f('fk_judgements_explanation_id_explanations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_judgements'))
    )
    with op.batch_alter_table('judgements', schema=None) as batch_op:
        batch_op.create_index('ix_judgements_explanation', ['explanation_id'], unique=False)

    _create_text_search()


def _create_text_search() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            "CREATE INDEX ix_explanations_text_fts ON explanations "
            "USING gin (to_tsvector('english', text))"
        )
    elif dialect == "sqlite":
        op.execute(
            "CREATE VIRTUAL TABLE explanations_fts USING fts5("
            "text, content='explanations', content_rowid='id', tokenize='porter unicode61')"
        )
        op.execute(
            "CREATE TRIGGER explanations_fts_insert AFTER INSERT ON explanations BEGIN "
            "INSERT INTO explanations_fts(rowid, text) VALUES (new.id, new.text); END"
        )
        op.execute(
            "CREATE TRIGGER explanations_fts_delete AFTER DELETE ON explanations BEGIN "
            "INSERT INTO explanations_fts(explanations_fts, rowid, text) VALUES ('delete', old.id, old.text); END"
        )
        op.execute(
            "CREATE TRIGGER explanations_fts_update AFTER UPDATE OF text ON explanations BEGIN "
            "INSERT INTO explanations_fts(explanations_fts, rowid, text) VALUES ('delete', old.id, old.text); "
            "INSERT INTO explanations_fts(rowid, text) VALUES (new.id, new.text); END"
        )


def _drop_text_search() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_explanations_text_fts")
    elif dialect == "sqlite":
        for trigger in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS explanations_fts_{trigger}")
        op.execute("DROP TABLE IF EXISTS explanations_fts")



def downgrade() -> None:
    _drop_text_search()
    with op.batch_alter_table('judgements', schema=None) as batch_op:
        batch_op.drop_index('ix_judgements_explanation')

    op.drop_table('judgements')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('uq_jobs_live_feature_kind', sqlite_where=sa.text("status IN ('queued', 'running')"), postgresql_where=sa.text("status IN ('queued', 'running')"))
        batch_op.drop_index('ix_jobs_sae_status')
        batch_op.drop_index('ix_jobs_claim')

    op.drop_table('jobs')
    with op.batch_alter_table('explanations', schema=None) as batch_op:
        batch_op.drop_index('ix_explanations_feature')

    op.drop_table('explanations')
    with op.batch_alter_table('examples', schema=None) as batch_op:
        batch_op.drop_index('ix_examples_feature_kind_rank')

    op.drop_table('examples')
    with op.batch_alter_table('features', schema=None) as batch_op:
        batch_op.drop_index('ix_features_sae_score')
        batch_op.drop_index('ix_features_sae_peak_token')
        batch_op.drop_index('ix_features_sae_max_act')
        batch_op.drop_index('ix_features_sae_density')

    op.drop_table('features')
    with op.batch_alter_table('saes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_saes_status'))
        batch_op.drop_index(batch_op.f('ix_saes_lm_id'))

    op.drop_table('saes')
    op.drop_table('lms')
    op.drop_table('api_keys')
