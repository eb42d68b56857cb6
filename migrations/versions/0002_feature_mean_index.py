"""Index features by (sae_id, mean_act) for the SAE table's sort by mean activation.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("features", schema=None) as batch_op:
        batch_op.create_index("ix_features_sae_mean_act", ["sae_id", "mean_act"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("features", schema=None) as batch_op:
        batch_op.drop_index("ix_features_sae_mean_act")
