"""The service at scale: claim-order indexes, jobs.feature_id, int64 step counts, key scopes, sessions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

- ix_jobs_claim / ix_runs_claim become (status, priority DESC, id): the claim's own order, so a
  claim reads the first runnable rows of the index instead of sorting the whole queue.
- ix_jobs_feature_id: a plain index, so deleting a feature (an SAE being replaced) finds its jobs.
- ix_jobs_lease_expires_at: every claim first requeues expired leases (only running jobs have one).
- runs.step / total_steps / resumed_from_step and run_metrics.step become BIGINT on PostgreSQL
  (SQLite's INTEGER is 64-bit already; no table copy is made there).
- api_keys.scope ('read' or 'write'; existing keys keep writing) and the web_sessions table.
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_jobs_claim', table_name='jobs')
    op.create_index('ix_jobs_claim', 'jobs', ['status', sa.text('priority DESC'), 'id'], unique=False)
    op.create_index('ix_jobs_feature_id', 'jobs', ['feature_id'], unique=False)
    op.create_index('ix_jobs_lease_expires_at', 'jobs', ['lease_expires_at'], unique=False)
    op.drop_index('ix_runs_claim', table_name='runs')
    op.create_index('ix_runs_claim', 'runs', ['status', sa.text('priority DESC'), 'id'], unique=False)

    if op.get_bind().dialect.name == 'postgresql':
        for table, column, nullable in (('runs', 'step', False), ('runs', 'total_steps', False),
                                        ('runs', 'resumed_from_step', True), ('run_metrics', 'step', False)):
            op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer(),
                            existing_nullable=nullable)

    # A plain ADD COLUMN on both backends (no table copy).
    op.add_column('api_keys', sa.Column('scope', sa.String(length=10), nullable=False, server_default='write'))

    op.create_table('web_sessions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('api_key_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['api_key_id'], ['api_keys.id'], name=op.f('fk_web_sessions_api_key_id_api_keys'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_web_sessions')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_web_sessions_token_hash'))
    )
    op.create_index('ix_web_sessions_api_key_id', 'web_sessions', ['api_key_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_web_sessions_api_key_id', table_name='web_sessions')
    op.drop_table('web_sessions')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('scope')
    if op.get_bind().dialect.name == 'postgresql':
        for table, column, nullable in (('runs', 'step', False), ('runs', 'total_steps', False),
                                        ('runs', 'resumed_from_step', True), ('run_metrics', 'step', False)):
            op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger(),
                            existing_nullable=nullable)
    op.drop_index('ix_runs_claim', table_name='runs')
    op.create_index('ix_runs_claim', 'runs', ['status', 'priority', 'run_after', 'id'], unique=False)
    op.drop_index('ix_jobs_lease_expires_at', table_name='jobs')
    op.drop_index('ix_jobs_feature_id', table_name='jobs')
    op.drop_index('ix_jobs_claim', table_name='jobs')
    op.create_index('ix_jobs_claim', 'jobs', ['status', 'priority', 'run_after', 'id'], unique=False)
