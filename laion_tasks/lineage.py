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

import datetime as dt
import functools
import hashlib
import logging
import socket
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from laion_tasks.stage import STAGE_MODULES, VIEW_STAGES, ShardStats

metadata_obj = sa.MetaData()

snapshot_table = sa.Table(
    "snapshot",
    metadata_obj,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("root_uri", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("config_digest", sa.String(32), nullable=True),
)

shard_run_table = sa.Table(
    "shard_run",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("snapshot_id", sa.String(64), sa.ForeignKey("snapshot.id"), nullable=False),
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("shard_id", sa.String(255), nullable=False),
    sa.Column("input_uri", sa.Text, nullable=False),
    sa.Column("output_uri", sa.Text, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # running | done | failed
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("bytes_written", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("checksum", sa.String(64), nullable=True),
    sa.Column("config_digest", sa.String(32), nullable=False),
    sa.Column("inputs_digest", sa.String(32), nullable=True),
    sa.Column("code_version", sa.String(64), nullable=False),
    sa.Column("host", sa.String(255), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("duration_s", sa.Float, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.UniqueConstraint("snapshot_id", "stage", "shard_id", "config_digest", "attempt", name="uq_shard_attempt"),
)
sa.Index("ix_shard_run_lookup", shard_run_table.c.snapshot_id, shard_run_table.c.stage, shard_run_table.c.shard_id)
sa.Index("ix_shard_run_status", shard_run_table.c.snapshot_id, shard_run_table.c.stage, shard_run_table.c.status)
sa.Index(  # migration 0003: the database, not only finish(), allows one current run per shard
    "uq_shard_run_one_done",
    shard_run_table.c.snapshot_id,
    shard_run_table.c.stage,
    shard_run_table.c.shard_id,
    unique=True,
    postgresql_where=sa.text("status = 'done'"),
    sqlite_where=sa.text("status = 'done'"),
)

shard_outcome_table = sa.Table(
    "shard_outcome",
    metadata_obj,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("shard_run.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("outcome", sa.String(128), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
)

shard_diagnostic_table = sa.Table(
    "shard_diagnostic",
    metadata_obj,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("shard_run.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def code_version() -> str:
    try:
        return metadata.version("laion-tasks")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@functools.lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """A pooled engine per URL; SQLite gets a busy timeout so parallel tasks wait, not fail."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


_migrated: set[str] = set()


def migrate(url: str) -> None:
    """Bring the lineage schema to the newest Alembic revision (once per process per database)."""
    if url in _migrated:
        return
    # Alembic logs its plugins (on import) and migration context at INFO on every command: keep its warnings only.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with engine_for(url).begin() as conn:
        _one_migration_at_a_time(conn)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    _migrated.add(url)


MIGRATION_LOCK_ID = 0x1A10_4E11
"""PostgreSQL advisory lock key that serialises lineage migrations."""


def _one_migration_at_a_time(conn: sa.Connection) -> None:
    """Mapped tasks start together on a fresh database (an Airflow deployment's first extract
    batch); unserialised, two of them create ``alembic_version`` at once and one fails.
    The lock lasts until this transaction ends."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock now, not at the first DDL


SHARD_LOCK_SALT = b"laion-lineage-shard-done"
"""Salts the PostgreSQL advisory lock key of a (snapshot, stage, shard): see :func:`_lock_shard`."""


def _shard_lock_key(snapshot_id: str, stage: str, shard_id: str) -> int:
    """A signed 64-bit key (pg_advisory_xact_lock's bigint) from a hash of the shard's identity.

    Two shards whose keys collide only wait for each other's finish; nothing is lost.
    """
    ident = "\x1f".join((snapshot_id, stage, shard_id)).encode()
    digest = hashlib.blake2b(ident, digest_size=8, key=SHARD_LOCK_SALT).digest()
    return int.from_bytes(digest, "big", signed=True)


def _serialise_writes(conn: sa.Connection) -> None:
    """On SQLite, take the database write lock before the first read of a transaction.

    A deferred transaction that reads first and then writes under WAL can fail with
    SQLITE_BUSY at its first write, without waiting, when another writer committed in
    between; ``BEGIN IMMEDIATE`` waits (busy timeout) for the lock instead, so writers
    run one at a time. PostgreSQL needs nothing here.
    """
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _lock_shard(conn: sa.Connection, snapshot_id: str, stage: str, shard_id: str) -> None:
    """Hold a lock on one (snapshot, stage, shard) until the transaction ends.

    On PostgreSQL, a transaction-scoped advisory lock on a hash of the key: a
    ``SELECT ... FOR UPDATE`` of the current done row locks nothing when there is no done
    row yet, the case of a shard's first two attempts finishing at once. Statements after
    the lock see every finish that committed before it (READ COMMITTED takes a new
    snapshot per statement). On SQLite, :func:`_serialise_writes` already holds the
    database's single write lock.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _shard_lock_key(snapshot_id, stage, shard_id)}
        )


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
                        id=snapshot_id, root_uri=root_uri, created_at=_utcnow(), config_digest=config_digest
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
                    started_at=_utcnow(),
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
            _serialise_writes(conn)
            row = conn.execute(sa.select(t).where(t.c.id == run_id)).mappings().one()
            _lock_shard(conn, row["snapshot_id"], row["stage"], row["shard_id"])
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
                    finished_at=_utcnow(),
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
                .values(status="failed", finished_at=_utcnow(), error=error[:20_000])
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
