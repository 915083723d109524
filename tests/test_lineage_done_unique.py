"""One ``done`` run per (snapshot, stage, shard), by construction, on SQLite and PostgreSQL.

``uq_shard_run_one_done`` (migration 0003) forbids a second done row; ``Lineage.finish``
locks the shard so that two attempts finishing at once (a zombie task and its retry)
both succeed and leave exactly one done row: the later finisher's.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import multiprocessing.synchronize
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from laion_tasks.lineage import MIGRATIONS_DIR, Lineage, engine_for, shard_run_table
from laion_tasks.runner import StageRun, run_stage
from laion_tasks.stage import ShardStats

ITERATIONS = 100
"""Races per database. Each one is a shard whose two attempts finish behind one barrier."""

INDEX = "uq_shard_run_one_done"

_attempts = itertools.count(1000)
"""Attempt numbers for rows inserted by hand: never a ``uq_shard_attempt`` clash."""


def _stats(n: int) -> ShardStats:
    stats = ShardStats(output_uri="out://shard")
    stats.add("kept", n)
    return stats


def _finisher(url: str, run_ids: list[int], barrier: multiprocessing.synchronize.Barrier, results: Any) -> None:
    """One contender: for each race, wait for the other one, then finish its own run."""
    lineage = Lineage(url)
    errors: list[tuple[int, str]] = []
    for run_id in run_ids:
        barrier.wait(timeout=120)
        try:
            lineage.finish(run_id, _stats(run_id))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            errors.append((run_id, f"{type(exc).__name__}: {exc}"))
    results.put(errors)


def test_two_attempts_finishing_at_once_leave_one_done_row(lineage_url: str) -> None:
    """Two processes finish the same shard at the same moment, many times over.

    Odd shards already have a done run from an earlier attempt (its demote races too);
    even shards have none (nothing for a row lock to hold: the advisory lock's case).
    """
    lineage = Lineage(lineage_url)
    lineage.ensure_snapshot("s", "/data")
    earlier: dict[str, int] = {}
    contenders: dict[str, tuple[int, int]] = {}
    for i in range(ITERATIONS):
        shard = f"{i:06d}"
        if i % 2:
            earlier[shard] = lineage.start("s", "download", shard, "in", "old")
            lineage.finish(earlier[shard], _stats(1))
        # a zombie attempt and its retry, both started, neither finished
        contenders[shard] = (lineage.start("s", "download", shard, "in", "d"), lineage.start("s", "download", shard, "in", "d"))

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    shards = sorted(contenders)
    procs = [
        ctx.Process(target=_finisher, args=(lineage_url, [contenders[s][k] for s in shards], barrier, results))
        for k in (0, 1)
    ]
    for proc in procs:
        proc.start()
    errors = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert errors == [[], []], "a finish failed under contention"

    runs = lineage.runs("s", "download")
    done = Counter(r["shard_id"] for r in runs if r["status"] == "done")
    assert done == Counter({shard: 1 for shard in shards}), "each shard must have exactly one done run"
    by_id = {r["id"]: r for r in runs}
    for shard in shards:
        a, b = contenders[shard]
        statuses = sorted((by_id[a]["status"], by_id[b]["status"]))
        assert statuses == ["done", "superseded"], f"shard {shard}: contenders are {statuses}"
        if shard in earlier:
            assert by_id[earlier[shard]]["status"] == "superseded", f"shard {shard}: earlier done run not demoted"
        winner = a if by_id[a]["status"] == "done" else b
        # the done row carries its own counts, written in the same transaction
        assert lineage.outcomes(winner) == {"kept": winner}
        assert lineage.current_record("s", "download", shard)["id"] == winner  # type: ignore[index]
    assert sum(r.count for r in lineage.funnel("s")) == sum(a if by_id[a]["status"] == "done" else b for a, b in contenders.values())


def _insert(conn: sa.Connection, shard: str, status: str, stage: str = "tag", snapshot: str = "s") -> None:
    conn.execute(
        shard_run_table.insert().values(
            snapshot_id=snapshot,
            stage=stage,
            shard_id=shard,
            input_uri="in",
            status=status,
            attempt=next(_attempts),
            config_digest="other",
            code_version="v",
            started_at=sa.func.current_timestamp(),
        )
    )


def _assert_violates_index(excinfo: pytest.ExceptionInfo[sa.exc.IntegrityError]) -> None:
    """The error is the one-done-row index, not some other constraint."""
    orig = excinfo.value.orig
    diag = getattr(orig, "diag", None)
    if diag is not None:  # psycopg2
        assert diag.constraint_name == INDEX, str(orig)
    else:  # sqlite3 names the index's columns
        assert str(orig) == "UNIQUE constraint failed: shard_run.snapshot_id, shard_run.stage, shard_run.shard_id"


def test_second_done_row_violates_the_index(lineage_url: str) -> None:
    """The database itself refuses a second done row, whatever code writes it."""
    lineage = Lineage(lineage_url)
    lineage.ensure_snapshot("s", "/data")
    lineage.ensure_snapshot("t", "/data")
    run_stage(lineage, StageRun("s", "tag", "000001", "in", "d"), lambda: _stats(3))

    with pytest.raises(sa.exc.IntegrityError) as excinfo:
        with lineage.engine.begin() as conn:
            _insert(conn, "000001", "done")
    _assert_violates_index(excinfo)
    # the index is partial and keyed on (snapshot, stage, shard): all of these are allowed
    with lineage.engine.begin() as conn:
        _insert(conn, "000001", "superseded")
        _insert(conn, "000001", "failed")
        _insert(conn, "000002", "done")
        _insert(conn, "000001", "done", stage="clip")
        _insert(conn, "000001", "done", snapshot="t")
    assert [r["status"] for r in lineage.runs("s", "tag") if r["shard_id"] == "000001"] == ["done", "superseded", "failed"]

    (index,) = [ix for ix in sa.inspect(lineage.engine).get_indexes("shard_run") if ix["name"] == INDEX]
    assert index["unique"] and index["column_names"] == ["snapshot_id", "stage", "shard_id"]


def test_metadata_and_migrations_agree(lineage_url: str) -> None:
    """The table metadata in lineage.py declares the index the migrations create (and nothing else differs)."""
    from alembic.migration import MigrationContext
    from alembic.autogenerate import compare_metadata

    from laion_tasks.lineage import metadata_obj

    lineage = Lineage(lineage_url)
    with lineage.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata_obj)
    assert diffs == []
    declared = [ix for ix in sa.Table("shard_run", sa.MetaData(), autoload_with=lineage.engine).indexes if ix.name == INDEX]
    assert len(declared) == 1 and declared[0].unique


def _alembic(url: str, verb: str, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with engine_for(url).begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, verb)(cfg, revision)


def test_migration_repairs_duplicate_done_rows(lineage_url: str) -> None:
    """A 0002 database with duplicate done rows (the race happened) upgrades to one done row per shard.

    The done row with the highest id is kept, whatever the finish times say: the row
    that every reader (``current_record``) already took as current.
    """
    _alembic(lineage_url, "upgrade", "0002")
    rows = [  # (snapshot, stage, shard, status, finished_at)
        ("s", "tag", "000001", "done", "2024-01-01 00:00:03"),
        ("s", "tag", "000001", "superseded", "2024-01-01 00:00:04"),
        ("s", "tag", "000001", "done", "2024-01-01 00:00:05"),
        ("s", "tag", "000001", "done", "2024-01-01 00:00:01"),  # newest row, earliest finish
        ("s", "tag", "000002", "done", "2024-01-01 00:00:00"),
        ("s", "clip", "000001", "done", "2024-01-01 00:00:00"),
        ("t", "tag", "000001", "done", "2024-01-01 00:00:00"),
        ("t", "tag", "000001", "done", "2024-01-01 00:00:09"),
        ("t", "tag", "000001", "running", None),
    ]
    with engine_for(lineage_url).begin() as conn:
        for snap in ("s", "t"):
            conn.execute(sa.text("INSERT INTO snapshot (id, root_uri, created_at) VALUES (:s, '/d', CURRENT_TIMESTAMP)"), {"s": snap})
        for attempt, (snap, stage, shard, status, finished) in enumerate(rows, start=1):
            conn.execute(
                sa.text(
                    "INSERT INTO shard_run (snapshot_id, stage, shard_id, input_uri, status, attempt, config_digest, "
                    "code_version, started_at, finished_at) "
                    "VALUES (:snap, :stage, :shard, 'in', :status, :attempt, 'd', 'v', CURRENT_TIMESTAMP, :finished)"
                ),
                {"snap": snap, "stage": stage, "shard": shard, "status": status, "attempt": attempt, "finished": finished},
            )
    _alembic(lineage_url, "upgrade", "head")

    lineage = Lineage(lineage_url)
    got = [(r["stage"], r["shard_id"], r["status"]) for r in lineage.runs("s")] + [
        (r["stage"], r["shard_id"], r["status"]) for r in lineage.runs("t")
    ]
    assert got == [
        ("tag", "000001", "superseded"),
        ("tag", "000001", "superseded"),
        ("tag", "000001", "superseded"),
        ("tag", "000001", "done"),
        ("tag", "000002", "done"),
        ("clip", "000001", "done"),
        ("tag", "000001", "superseded"),
        ("tag", "000001", "done"),
        ("tag", "000001", "running"),
    ]
    # the repaired database enforces the rule, and finishing still works on it
    with pytest.raises(sa.exc.IntegrityError) as excinfo:
        with lineage.engine.begin() as conn:
            _insert(conn, "000002", "done")
    _assert_violates_index(excinfo)
    run_stage(lineage, StageRun("s", "tag", "000002", "in", "d2"), lambda: _stats(7))
    assert [r["status"] for r in lineage.runs("s", "tag") if r["shard_id"] == "000002"] == ["superseded", "done"]

    # downgrade drops the index (a second done row is accepted again), upgrade restores it
    _alembic(lineage_url, "downgrade", "0002")
    assert INDEX not in {ix["name"] for ix in sa.inspect(engine_for(lineage_url)).get_indexes("shard_run")}
    _alembic(lineage_url, "upgrade", "head")
    assert INDEX in {ix["name"] for ix in sa.inspect(engine_for(lineage_url)).get_indexes("shard_run")}
