"""Skip keys cover inputs; one current run per (stage, shard); diagnostics apart from outcomes.

- ``shard_run.inputs_digest``: digest of the exact upstream outputs a run read (their
  checksums or run ids). A done run is reused only when both its config digest and its
  inputs digest match.
- Older ``done`` rows of a (snapshot, stage, shard) become ``superseded``: outputs live
  at one path per shard, so only the newest done run describes what is on storage, and
  counts add up the current generation only.
- ``shard_diagnostic``: counts that are not outcomes of input rows (never summed in a funnel).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("shard_run") as batch:
        batch.add_column(sa.Column("inputs_digest", sa.String(32), nullable=True))
    op.create_table(
        "shard_diagnostic",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("shard_run.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_shard_run_status", "shard_run", ["snapshot_id", "stage", "status"])
    # Keep only the newest done run of each (snapshot, stage, shard) as 'done'.
    op.execute(
        """
        UPDATE shard_run SET status = 'superseded'
        WHERE status = 'done' AND id < (
            SELECT max(newer.id) FROM shard_run AS newer
            WHERE newer.snapshot_id = shard_run.snapshot_id AND newer.stage = shard_run.stage
              AND newer.shard_id = shard_run.shard_id AND newer.status = 'done'
        )
        """
    )
    # Outcomes that were counted on top of a row's outcome are diagnostics now.
    for old, new in (("bad:tar_key_not_in_parquet", "tar_key_not_in_parquet"), ("bad:sha256_not_hex", "sha256_not_hex")):
        op.execute(
            f"INSERT INTO shard_diagnostic (run_id, name, count) "
            f"SELECT run_id, '{new}', count FROM shard_outcome WHERE outcome = '{old}'"
        )
        op.execute(f"DELETE FROM shard_outcome WHERE outcome = '{old}'")


def downgrade() -> None:
    op.drop_index("ix_shard_run_status", table_name="shard_run")
    op.drop_table("shard_diagnostic")
    with op.batch_alter_table("shard_run") as batch:
        batch.drop_column("inputs_digest")
