"""The lineage database: its tables, engines, Alembic migrations and the locks that keep it consistent.

:mod:`laion_tasks.lineage` is the store on top of it (recording and queries).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
from importlib import metadata
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

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


def utcnow() -> dt.datetime:
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
"""Salts the PostgreSQL advisory lock key of a (snapshot, stage, shard): see :func:`lock_shard`."""


def _shard_lock_key(snapshot_id: str, stage: str, shard_id: str) -> int:
    """A signed 64-bit key (pg_advisory_xact_lock's bigint) from a hash of the shard's identity.

    Two shards whose keys collide only wait for each other's finish; nothing is lost.
    """
    ident = "\x1f".join((snapshot_id, stage, shard_id)).encode()
    digest = hashlib.blake2b(ident, digest_size=8, key=SHARD_LOCK_SALT).digest()
    return int.from_bytes(digest, "big", signed=True)


def serialise_writes(conn: sa.Connection) -> None:
    """On SQLite, take the database write lock before the first read of a transaction.

    A deferred transaction that reads first and then writes under WAL can fail with
    SQLITE_BUSY at its first write, without waiting, when another writer committed in
    between; ``BEGIN IMMEDIATE`` waits (busy timeout) for the lock instead, so writers
    run one at a time. PostgreSQL needs nothing here.
    """
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def lock_shard(conn: sa.Connection, snapshot_id: str, stage: str, shard_id: str) -> None:
    """Hold a lock on one (snapshot, stage, shard) until the transaction ends.

    On PostgreSQL, a transaction-scoped advisory lock on a hash of the key: a
    ``SELECT ... FOR UPDATE`` of the current done row locks nothing when there is no done
    row yet, the case of a shard's first two attempts finishing at once. Statements after
    the lock see every finish that committed before it (READ COMMITTED takes a new
    snapshot per statement). On SQLite, :func:`serialise_writes` already holds the
    database's single write lock.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _shard_lock_key(snapshot_id, stage, shard_id)}
        )
