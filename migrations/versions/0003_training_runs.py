"""Training runs as queue rows, their metric history, and saes.run_id (the run that made an SAE).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

saes.run_id is added with a plain ALTER TABLE on SQLite: a batch (copy-and-rename) migration of
`saes` would DROP the old table, and with foreign keys on, SQLite's implicit DELETE would cascade
to every feature. For the same reason the SQLite downgrade leaves the (nullable, unused) column
in place, and the upgrade adds it only when it is missing.
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('gpus', sa.SmallInteger(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('run_after', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('phase', sa.String(length=20), nullable=True),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('total_steps', sa.Integer(), nullable=False),
    sa.Column('resumed_from_step', sa.Integer(), nullable=True),
    sa.Column('latest', sa.JSON(), nullable=False),
    sa.Column('log_tail', sa.Text(), nullable=False),
    sa.Column('log_offsets', sa.JSON(), nullable=False),
    sa.Column('workdir', sa.String(length=2000), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('requested_by', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs')),
    sa.UniqueConstraint('name', name=op.f('uq_runs_name'))
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index('ix_runs_claim', ['status', 'priority', 'run_after', 'id'], unique=False)
        batch_op.create_index('ix_runs_created_at', ['created_at'], unique=False)

    op.create_table('run_metrics',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('sae', sa.String(length=200), nullable=False),
    sa.Column('attempt', sa.SmallInteger(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('loss', sa.Float(), nullable=True),
    sa.Column('fvu', sa.Float(), nullable=True),
    sa.Column('l0', sa.Float(), nullable=True),
    sa.Column('dead_frac', sa.Float(), nullable=True),
    sa.Column('lr', sa.Float(), nullable=True),
    sa.Column('elapsed_s', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_metrics_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_run_metrics'))
    )
    with op.batch_alter_table('run_metrics', schema=None) as batch_op:
        batch_op.create_index('ix_run_metrics_run_sae_step', ['run_id', 'sae', 'step'], unique=False)

    if op.get_bind().dialect.name == "sqlite":
        columns = [c["name"] for c in sa.inspect(op.get_bind()).get_columns("saes")]
        if "run_id" not in columns:
            op.execute("ALTER TABLE saes ADD COLUMN run_id INTEGER "
                       "CONSTRAINT fk_saes_run_id_runs REFERENCES runs (id) ON DELETE SET NULL")
        op.create_index("ix_saes_run_id", "saes", ["run_id"], unique=False)
    else:
        op.add_column("saes", sa.Column("run_id", sa.Integer(), nullable=True))
        op.create_index("ix_saes_run_id", "saes", ["run_id"], unique=False)
        op.create_foreign_key("fk_saes_run_id_runs", "saes", "runs", ["run_id"], ["id"], ondelete="SET NULL")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.drop_index("ix_saes_run_id", table_name="saes")
        op.execute("UPDATE saes SET run_id = NULL")
    else:
        op.drop_constraint("fk_saes_run_id_runs", "saes", type_="foreignkey")
        op.drop_index("ix_saes_run_id", table_name="saes")
        op.drop_column("saes", "run_id")

    with op.batch_alter_table('run_metrics', schema=None) as batch_op:
        batch_op.drop_index('ix_run_metrics_run_sae_step')

    op.drop_table('run_metrics')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index('ix_runs_created_at')
        batch_op.drop_index('ix_runs_claim')

    op.drop_table('runs')
