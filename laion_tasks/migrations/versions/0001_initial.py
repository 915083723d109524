"""Initial lineage schema: snapshot, shard_run, shard_outcome.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "snapshot",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("root_uri", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("config_digest", sa.String(32), nullable=True),
    )
    op.create_table(
        "shard_run",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("snapshot_id", sa.String(64), sa.ForeignKey("snapshot.id"), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("shard_id", sa.String(255), nullable=False),
        sa.Column("input_uri", sa.Text, nullable=False),
        sa.Column("output_uri", sa.Text, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("bytes_written", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("checksum", sa.String(64), nullable=True),
        sa.Column("config_digest", sa.String(32), nullable=False),
        sa.Column("code_version", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_s", sa.Float, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.UniqueConstraint("snapshot_id", "stage", "shard_id", "config_digest", "attempt", name="uq_shard_attempt"),
    )
    op.create_index("ix_shard_run_lookup", "shard_run", ["snapshot_id", "stage", "shard_id"])
    op.create_table(
        "shard_outcome",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("shard_run.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("outcome", sa.String(128), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("shard_outcome")
    op.drop_index("ix_shard_run_lookup", table_name="shard_run")
    op.drop_table("shard_run")
    op.drop_table("snapshot")
