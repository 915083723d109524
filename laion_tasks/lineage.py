"""Shard-level lineage: what ran, on what, with which config, and what came out.

SQLAlchemy Core over SQLite (embedded default) or PostgreSQL (deployment); the schema
is created and upgraded by Alembic (``laion_tasks/migrations``). Re-runs consult it to
skip finished work, and :func:`funnel` answers "where did my candidates go?".

This module is a plain store: tables, queries and migrations. When a run may be reused, and
how a run is recorded around a stage call, is the runner's business (:mod:`laion_tasks.runner`).

One row of ``shard_run`` is one attempt of one stage on one shard. A run's *skip key* is
(stage, shard, ``config_digest`` of the knobs that change the stage's results,
``inputs_digest`` of the exact upstream outputs it read). At most one row per
(snapshot, stage, shard) is ``done``: the current generation, enforced by the unique
partial index ``uq_shard_run_one_done``. Finishing a run demotes
the previous done row to ``superseded``, so every count (funnel, card, views) adds up
the current generation only, each candidate once per stage. ``shard_outcome`` holds a
run's counts by outcome, ``shard_diagnostic`` its diagnostics. The done row and its
counts are written in a single transaction, so a crash or a database restart never
leaves a half-recorded shard.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from laion_tasks.lineage_db import (  # noqa: F401 - the store's schema and database, re-exported
    MIGRATIONS_DIR,
    lock_shard,
    serialise_writes,
    utcnow,
    code_version,
    engine_for,
    metadata_obj,
    migrate,
    shard_diagnostic_table,
    shard_outcome_table,
    shard_run_table,
    snapshot_table,
)
from laion_tasks.stage import STAGE_MODULES, VIEW_STAGES, ShardStats


class Lineage:
    """Records stage runs for one database."""

    def __init__(self, url: str, *, auto_migrate: bool = True) -> None:
        self.url = url
        if auto_migrate:
            migrate(url)
        self.engine = engine_for(url)

    # -- snapshots -------------------------------------------------------
    def ensure_snapshot(self, snapshot_id: str, root_uri: str, config_digest: str | None = None) -> None:
        with self.engine.begin() as conn:
            exists = conn.execute(
                sa.select(snapshot_table.c.id).where(snapshot_table.c.id == snapshot_id)
            ).first()
            if exists is None:
                conn.execute(
                    snapshot_table.insert().values(
                        id=snapshot_id, root_uri=root_uri, created_at=utcnow(), config_digest=config_digest
                    )
                )

    # -- shard runs ------------------------------------------------------
    def current_record(self, snapshot_id: str, stage: str, shard_id: str) -> dict[str, Any] | None:
        """The done run of the current generation of one shard, or None."""
        t = shard_run_table
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t)
                .where(t.c.snapshot_id == snapshot_id, t.c.stage == stage, t.c.shard_id == shard_id, t.c.status == "done")
                .order_by(t.c.id.desc())
                .limit(1)
            ).mappings().first()
        return dict(row) if row else None

    def current_runs(self, snapshot_id: str, stages: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
        """The done runs (current generation) of some stages: stage, shard_id, id, checksum, output_uri."""
        t = shard_run_table
        query = (
            sa.select(t.c.stage, t.c.shard_id, t.c.id, t.c.checksum, t.c.output_uri)
            .where(t.c.snapshot_id == snapshot_id, t.c.stage.in_(list(stages)), t.c.status == "done")
            .order_by(t.c.stage, t.c.shard_id, t.c.id)
        )
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def supersede(self, snapshot_id: str, stages: tuple[str, ...] | list[str], keep: set[str]) -> int:
        """Retire the done runs of shards that are no longer planned (e.g. after a re-plan); returns how many."""
        t = shard_run_table
        with self.engine.begin() as conn:
            ids = [
                r.id
                for r in conn.execute(
                    sa.select(t.c.id, t.c.shard_id).where(
                        t.c.snapshot_id == snapshot_id, t.c.stage.in_(list(stages)), t.c.status == "done"
                    )
                )
                if r.shard_id not in keep
            ]
            for i in range(0, len(ids), 500):
                conn.execute(t.update().where(t.c.id.in_(ids[i : i + 500])).values(status="superseded"))
        return len(ids)

    def start(
        self, snapshot_id: str, stage: str, shard_id: str, input_uri: str, config_digest: str, inputs_digest: str | None = None
    ) -> int:
        t = shard_run_table
        with self.engine.begin() as conn:
            last = conn.execute(
                sa.select(sa.func.max(t.c.attempt)).where(
                    t.c.snapshot_id == snapshot_id,
                    t.c.stage == stage,
                    t.c.shard_id == shard_id,
                    t.c.config_digest == config_digest,
                )
            ).scalar()
            result = conn.execute(
                t.insert().values(
                    snapshot_id=snapshot_id,
                    stage=stage,
                    shard_id=shard_id,
                    input_uri=input_uri,
                    status="running",
                    attempt=(last or 0) + 1,
                    config_digest=config_digest,
                    inputs_digest=inputs_digest,
                    code_version=code_version(),
                    host=socket.gethostname(),
                    started_at=utcnow(),
                )
            )
            return int(result.inserted_primary_key[0])

    def finish(self, run_id: int, stats: ShardStats) -> None:
        """Mark a run done and store its counts, atomically.

        The previous ``done`` row of the same shard (whatever its digests) is demoted to
        ``superseded``: the shard's output now holds this run's result, and lineage shows
        exactly one done record per (stage, shard).

        Two attempts of one shard may finish at once (a zombie task and its retry). The
        shard is locked before the demote, so the finishes run one after the other: the
        later one supersedes the earlier one and is the done row; neither fails. Both
        attempts wrote the shard's one output object; the done row is the later
        finisher's record of it. Without the lock, under PostgreSQL READ COMMITTED neither demote
        sees the other's uncommitted done row, and the second promote would hit
        ``uq_shard_run_one_done``.
        """
        t = shard_run_table
        with self.engine.begin() as conn:
            serialise_writes(conn)
            row = conn.execute(sa.select(t).where(t.c.id == run_id)).mappings().one()
            lock_shard(conn, row["snapshot_id"], row["stage"], row["shard_id"])
            conn.execute(
                t.update()
                .where(
                    t.c.snapshot_id == row["snapshot_id"],
                    t.c.stage == row["stage"],
                    t.c.shard_id == row["shard_id"],
                    t.c.status == "done",
                )
                .values(status="superseded")
            )
            conn.execute(
                t.update()
                .where(t.c.id == run_id)
                .values(
                    status="done",
                    output_uri=stats.output_uri,
                    bytes_written=stats.bytes_written,
                    checksum=stats.checksum,
                    finished_at=utcnow(),
                    duration_s=stats.duration_s,
                )
            )
            if stats.counts:
                conn.execute(
                    shard_outcome_table.insert(),
                    [{"run_id": run_id, "outcome": k, "count": int(v)} for k, v in sorted(stats.counts.items())],
                )
            if stats.diagnostics:
                conn.execute(
                    shard_diagnostic_table.insert(),
                    [{"run_id": run_id, "name": k, "count": int(v)} for k, v in sorted(stats.diagnostics.items())],
                )

    def fail(self, run_id: int, error: str) -> None:
        t = shard_run_table
        with self.engine.begin() as conn:
            conn.execute(
                t.update()
                .where(t.c.id == run_id)
                .values(status="failed", finished_at=utcnow(), error=error[:20_000])
            )

    def runs(self, snapshot_id: str, stage: str | None = None) -> list[dict[str, Any]]:
        t = shard_run_table
        query = sa.select(t).where(t.c.snapshot_id == snapshot_id)
        if stage:
            query = query.where(t.c.stage == stage)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query.order_by(t.c.id)).mappings()]

    def outcomes(self, run_id: int) -> dict[str, int]:
        o = shard_outcome_table
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(o.c.outcome, o.c.count).where(o.c.run_id == run_id))
            return {r.outcome: int(r.count) for r in rows}

    def diagnostics(self, run_id: int) -> dict[str, int]:
        d = shard_diagnostic_table
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(d.c.name, d.c.count).where(d.c.run_id == run_id))
            return {r.name: int(r.count) for r in rows}

    def funnel(self, snapshot_id: str) -> list[FunnelRow]:
        """Counts per (stage, outcome) over the current generation of a snapshot, in pipeline order.

        Only ``done`` runs count, and there is one per (stage, shard): superseded runs
        (re-runs, retried downloads, shards dropped by a re-plan) never add up twice.

        Stages whose "shards" are alternative views of the same rows (each curated subset
        counts every sample once) are reported per shard, as ``curate/<subset>``.
        """
        t, o = shard_run_table, shard_outcome_table
        per_view = t.c.stage.in_(VIEW_STAGES)
        label = sa.case((per_view, t.c.stage + "/" + t.c.shard_id), else_=t.c.stage)
        query = (
            sa.select(label.label("stage"), o.c.outcome, sa.func.sum(o.c.count).label("n"), sa.func.count().label("shards"))
            .select_from(t.join(o, o.c.run_id == t.c.id))
            .where(t.c.snapshot_id == snapshot_id, t.c.status == "done")
            .group_by(label, o.c.outcome)
        )
        with self.engine.connect() as conn:
            rows = [FunnelRow(r.stage, r.outcome, int(r.n), int(r.shards)) for r in conn.execute(query)]
        order = {name: i for i, name in enumerate(STAGE_MODULES)}  # pipeline order
        return sorted(rows, key=lambda r: (order.get(r.stage.split("/")[0], 99), r.stage, -r.count, r.outcome))

    def shard_summary(self, snapshot_id: str) -> dict[str, dict[str, int]]:
        """Per stage: how many shards are done / failed / running, by each shard's latest attempt.

        Superseded runs are history, not state: they are not counted.
        """
        t = shard_run_table
        latest = (
            sa.select(sa.func.max(t.c.id).label("id"))
            .where(t.c.snapshot_id == snapshot_id, t.c.status != "superseded")
            .group_by(t.c.stage, t.c.shard_id)
            .subquery()
        )
        query = (
            sa.select(t.c.stage, t.c.status, sa.func.count().label("n"))
            .select_from(t.join(latest, latest.c.id == t.c.id))
            .group_by(t.c.stage, t.c.status)
        )
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for r in conn.execute(query):
                out.setdefault(r.stage, {})[r.status] = int(r.n)
        return out

    def snapshots(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(snapshot_table).order_by(snapshot_table.c.id)).mappings()]


@dataclass(frozen=True)
class FunnelRow:
    stage: str
    outcome: str
    count: int
    shards: int
