"""At most one ``done`` run per (snapshot, stage, shard), enforced by the database.

Until now only ``Lineage.finish`` kept this rule, and two attempts finishing at once under
PostgreSQL READ COMMITTED (a zombie task and its retry) could both leave a ``done`` row.
A unique partial index ``uq_shard_run_one_done`` on (snapshot_id, stage, shard_id)
WHERE status = 'done' makes a second done row impossible on PostgreSQL and SQLite.

Existing duplicates are repaired first, deterministically: the done row with the highest
id stays ``done`` (the row every reader already took as current:
``Lineage.current_record`` orders by id), the others become ``superseded``.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

INDEX = "uq_shard_run_one_done"


def upgrade() -> None:
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
    done = sa.text("status = 'done'")
    op.create_index(
        INDEX,
        "shard_run",
        ["snapshot_id", "stage", "shard_id"],
        unique=True,
        postgresql_where=done,
        sqlite_where=done,
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="shard_run")
