"""Every lineage query the lineage views make, in one place.

The pages never touch the lineage tables themselves: they call these functions, so a change
to what lineage counts (for example only the current generation of a shard) is made here
once. Shard state is the *latest attempt* of each (stage, shard); ``superseded`` rows are
older done records and never a shard's state.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from laion_tasks.lineage import FunnelRow, Lineage, shard_run_table
from laion_tasks.stage import STAGE_MODULES as STAGE_ORDER  # pipeline order

SHARD_STATES = ("done", "failed", "running")


@dataclass(frozen=True)
class StageStatus:
    """Shards of one stage by the state of their latest attempt."""

    stage: str
    shards: int
    done: int
    failed: int
    running: int
    attempts: int
    failed_attempts: int
    retried_done: int
    """Shards that failed at least once and are done now."""
    duration_s: float
    """Sum over done shards' latest attempts."""


@dataclass(frozen=True)
class ShardAttempts:
    """One shard whose attempts include failures: its latest state and error."""

    stage: str
    shard_id: str
    status: str
    attempts: int
    failed_attempts: int
    input_uri: str
    error: str
    """The latest failed attempt's error."""
    finished_at: dt.datetime | None


def snapshots(lin: Lineage) -> list[dict[str, Any]]:
    return lin.snapshots()


def has_snapshot(lin: Lineage, snapshot: str) -> bool:
    return snapshot in {s["id"] for s in lin.snapshots()}


def funnel(lin: Lineage, snapshot: str) -> list[FunnelRow]:
    return lin.funnel(snapshot)


def shard_runs(lin: Lineage, snapshot: str, stage: str | None, status: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` attempts (oldest first), optionally of one stage / status."""
    t = shard_run_table
    query = sa.select(t).where(t.c.snapshot_id == snapshot)
    if stage:
        query = query.where(t.c.stage == stage)
    if status:
        query = query.where(t.c.status == status)
    with lin.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query.order_by(t.c.id.desc()).limit(limit)).mappings()]
    return rows[::-1]


def _per_shard(snapshot: str) -> Any:
    """One row per (stage, shard): latest attempt id, attempts, failed attempts."""
    t = shard_run_table
    live = t.c.status != "superseded"
    return (
        sa.select(
            t.c.stage,
            t.c.shard_id,
            sa.func.max(sa.case((live, t.c.id))).label("latest_id"),
            sa.func.count().label("attempts"),
            sa.func.sum(sa.case((t.c.status == "failed", 1), else_=0)).label("failed_attempts"),
            sa.func.max(sa.case((t.c.status == "failed", t.c.id))).label("last_failed_id"),
        )
        .where(t.c.snapshot_id == snapshot)
        .group_by(t.c.stage, t.c.shard_id)
        .subquery()
    )


def _stage_key(stage: str) -> tuple[int, str]:
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    return order.get(stage, len(order)), stage


def stage_status(lin: Lineage, snapshot: str) -> list[StageStatus]:
    """Per stage, in pipeline order: shards by latest state, attempts, retries and time."""
    t, s = shard_run_table, _per_shard(snapshot)
    latest = t.alias("latest")
    query = (
        sa.select(
            s.c.stage,
            latest.c.status,
            sa.func.count().label("shards"),
            sa.func.sum(s.c.attempts).label("attempts"),
            sa.func.sum(s.c.failed_attempts).label("failed_attempts"),
            sa.func.sum(sa.case((s.c.failed_attempts > 0, 1), else_=0)).label("retried"),
            sa.func.sum(sa.func.coalesce(latest.c.duration_s, 0.0)).label("duration_s"),
        )
        .select_from(s.join(latest, latest.c.id == s.c.latest_id))
        .group_by(s.c.stage, latest.c.status)
    )
    acc: dict[str, dict[str, float]] = {}
    with lin.engine.connect() as conn:
        for r in conn.execute(query):
            a = acc.setdefault(r.stage, {"shards": 0, "attempts": 0, "failed_attempts": 0, "retried_done": 0, "duration_s": 0.0})
            a[r.status] = a.get(r.status, 0) + int(r.shards)
            a["shards"] += int(r.shards)
            a["attempts"] += int(r.attempts or 0)
            a["failed_attempts"] += int(r.failed_attempts or 0)
            if r.status == "done":
                a["retried_done"] += int(r.retried or 0)
                a["duration_s"] += float(r.duration_s or 0.0)
    return [
        StageStatus(
            stage=stage,
            shards=int(a["shards"]),
            done=int(a.get("done", 0)),
            failed=int(a.get("failed", 0)),
            running=int(a.get("running", 0)),
            attempts=int(a["attempts"]),
            failed_attempts=int(a["failed_attempts"]),
            retried_done=int(a["retried_done"]),
            duration_s=float(a["duration_s"]),
        )
        for stage, a in sorted(acc.items(), key=lambda kv: _stage_key(kv[0]))
    ]


def shards_with_failures(lin: Lineage, snapshot: str, limit: int = 200) -> list[ShardAttempts]:
    """Shards with at least one failed attempt: still failing first, then the ones a retry fixed."""
    t, s = shard_run_table, _per_shard(snapshot)
    latest, failed = t.alias("latest"), t.alias("failed")
    still_failing = sa.case((latest.c.status == "failed", 0), else_=1)
    query = (
        sa.select(
            s.c.stage,
            s.c.shard_id,
            latest.c.status,
            s.c.attempts,
            s.c.failed_attempts,
            failed.c.input_uri,
            failed.c.error,
            failed.c.finished_at,
        )
        .select_from(s.join(latest, latest.c.id == s.c.latest_id).join(failed, failed.c.id == s.c.last_failed_id))
        .order_by(still_failing, failed.c.id.desc())
        .limit(limit)
    )
    with lin.engine.connect() as conn:
        return [
            ShardAttempts(r.stage, r.shard_id, r.status, int(r.attempts), int(r.failed_attempts), r.input_uri, r.error or "", r.finished_at)
            for r in conn.execute(query)
        ]
