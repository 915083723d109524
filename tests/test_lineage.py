"""The same lineage tests run on SQLite and PostgreSQL (``lineage_url`` is parametrised)."""

import pytest
import sqlalchemy as sa

from laion_tasks.lineage import Lineage, shard_run_table
from laion_tasks.runner import StageRun, run_stage
from laion_tasks.stage import ShardStats


def _there(uri: str) -> bool:
    return True


def _stats(**counts: int) -> ShardStats:
    stats = ShardStats(output_uri="out://x")
    for key, value in counts.items():
        stats.add(key.replace("__", ":"), value)
    return stats


def test_migrate_is_idempotent(lineage_url: str) -> None:
    Lineage(lineage_url)
    Lineage(lineage_url)  # second upgrade is a no-op
    inspector = sa.inspect(sa.create_engine(lineage_url))
    assert {"snapshot", "shard_run", "shard_outcome", "alembic_version"} <= set(inspector.get_table_names())


def test_concurrent_first_migrations_all_succeed(lineage_url: str) -> None:
    """An Airflow deployment's first mapped tasks all migrate a fresh lineage database at once."""
    import subprocess
    import sys

    code = "import sys; from laion_tasks.lineage import Lineage; Lineage(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, lineage_url], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(errors)[-3000:]


def test_run_skip_and_funnel(lineage_url: str) -> None:
    lineage = Lineage(lineage_url)
    lineage.ensure_snapshot("CC-MAIN-2024-10", "/data")
    calls = []

    def work(n: int):
        def fn() -> ShardStats:
            calls.append(n)
            return _stats(kept=n, drop__alt_too_short=1)

        return fn

    for shard in ("a", "b"):
        stats, skipped = run_stage(lineage, StageRun("CC-MAIN-2024-10", "extract", shard, f"in/{shard}", "d1"), work(3))
        assert not skipped and stats is not None
    _, skipped = run_stage(lineage, StageRun("CC-MAIN-2024-10", "extract", "a", "in/a", "d1"), work(99), output_exists=_there)
    assert skipped and calls == [3, 3]

    funnel = {(r.stage, r.outcome): r.count for r in lineage.funnel("CC-MAIN-2024-10")}
    assert funnel == {("extract", "kept"): 6, ("extract", "drop:alt_too_short"): 2}

    # a changed config digest runs again; the old record stays for audit, superseded
    run_stage(lineage, StageRun("CC-MAIN-2024-10", "extract", "a", "in/a", "d2"), work(5), output_exists=_there)
    assert calls == [3, 3, 5]
    # counts are the current generation's: shard a once (5), never its superseded run (3) as well
    funnel = {(r.stage, r.outcome): r.count for r in lineage.funnel("CC-MAIN-2024-10")}
    assert funnel == {("extract", "kept"): 8, ("extract", "drop:alt_too_short"): 2}
    assert lineage.shard_summary("CC-MAIN-2024-10") == {"extract": {"done": 2}}


def test_skip_key_covers_inputs_and_output(lineage_url: str) -> None:
    """Same knobs but other upstream outputs, or no way to see the output: the shard runs again."""
    lineage = Lineage(lineage_url)
    lineage.ensure_snapshot("s", "/data")
    calls: list[str] = []

    def fn(tag: str):  # type: ignore[no-untyped-def]
        def run() -> ShardStats:
            calls.append(tag)
            return _stats(kept=1)

        return run

    run = StageRun("s", "clip", "000001", "in", "knobs", inputs_digest="download-run-1", output_uri="out://clip/000001")
    run_stage(lineage, run, fn("first"), output_exists=_there)
    assert run_stage(lineage, run, fn("same"), output_exists=_there)[1] is True
    moved = StageRun("s", "clip", "000001", "in", "knobs", inputs_digest="download-run-2", output_uri="out://clip/000001")
    assert run_stage(lineage, moved, fn("new input"), output_exists=_there)[1] is False
    # a done record is never trusted without an existence check of its output
    assert run_stage(lineage, moved, fn("unchecked"), output_exists=None)[1] is False
    # the same key, but the run commits another object (a dedup shard that changed run): it runs
    elsewhere = StageRun("s", "clip", "000001", "in", "knobs", inputs_digest="download-run-2", output_uri="out://clip/other")
    assert run_stage(lineage, elsewhere, fn("other output"), output_exists=_there)[1] is False
    assert run_stage(lineage, elsewhere, fn("again"), output_exists=_there)[1] is True
    assert calls == ["first", "new input", "unchecked", "other output"]
    assert [r["status"] for r in lineage.runs("s", "clip")] == ["superseded", "superseded", "superseded", "done"]
    assert sum(r.count for r in lineage.funnel("s")) == 1


def test_diagnostics_are_not_outcomes(lineage_url: str) -> None:
    lineage = Lineage(lineage_url)
    lineage.ensure_snapshot("s", "/data")
    stats = _stats(success=3)
    stats.note("tar_key_not_in_parquet", 2)
    run_stage(lineage, StageRun("s", "tag", "000001", "in", "d"), lambda: stats)
    (row,) = lineage.runs("s", "tag")
    assert lineage.outcomes(row["id"]) == {"success": 3}
    assert lineage.diagnostics(row["id"]) == {"tar_key_not_in_parquet": 2}
    assert [(r.outcome, r.count) for r in lineage.funnel("s")] == [("success", 3)]


def test_migration_keeps_one_done_run_per_shard(lineage_url: str) -> None:
    """0001 data (done rows per digest, outcomes on top of success) upgrades to one current run per shard."""
    from alembic import command
    from alembic.config import Config

    from laion_tasks.lineage import MIGRATIONS_DIR, engine_for

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", lineage_url.replace("%", "%%"))
    with engine_for(lineage_url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    with engine_for(lineage_url).begin() as conn:
        conn.execute(sa.text("INSERT INTO snapshot (id, root_uri, created_at) VALUES ('s', '/d', CURRENT_TIMESTAMP)"))
        for run_id, digest in ((1, "old"), (2, "new")):
            conn.execute(sa.text(
                "INSERT INTO shard_run (id, snapshot_id, stage, shard_id, input_uri, status, attempt, config_digest, "
                "code_version, started_at) VALUES (:i, 's', 'tag', '000001', 'in', 'done', 1, :d, 'v', CURRENT_TIMESTAMP)"
            ), {"i": run_id, "d": digest})
            conn.execute(sa.text("INSERT INTO shard_outcome (run_id, outcome, count) VALUES (:i, 'success', 10)"), {"i": run_id})
        conn.execute(sa.text("INSERT INTO shard_outcome (run_id, outcome, count) VALUES (2, 'bad:tar_key_not_in_parquet', 4)"))
    with engine_for(lineage_url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    lineage = Lineage(lineage_url)
    assert [(r["id"], r["status"]) for r in lineage.runs("s")] == [(1, "superseded"), (2, "done")]
    assert [(r.outcome, r.count) for r in lineage.funnel("s")] == [("success", 10)]
    assert lineage.diagnostics(2) == {"tar_key_not_in_parquet": 4}


def test_failure_is_recorded_and_retry_gets_next_attempt(lineage_url: str) -> None:
    lineage = Lineage(lineage_url)
    lineage.ensure_snapshot("s", "/data")
    run = StageRun("s", "download", "000001", "in", "d")

    def boom() -> ShardStats:
        raise OSError("disk full while writing 000001.tar")

    with pytest.raises(OSError):
        run_stage(lineage, run, boom)
    stats, skipped = run_stage(lineage, run, lambda: _stats(success=7))
    assert not skipped
    rows = lineage.runs("s", "download")
    assert [(r["attempt"], r["status"]) for r in rows] == [(1, "failed"), (2, "done")]
    assert "disk full" in rows[0]["error"]
    assert lineage.outcomes(rows[1]["id"]) == {"success": 7}
    assert lineage.shard_summary("s") == {"download": {"done": 1}}  # by each shard's latest attempt


def test_forced_rerun_keeps_one_done_record(lineage_url: str) -> None:
    lineage = Lineage(lineage_url)
    lineage.ensure_snapshot("s", "/data")
    run = StageRun("s", "clip", "000001", "in", "d")
    run_stage(lineage, run, lambda: _stats(kept=1))
    run_stage(lineage, run, lambda: _stats(kept=1), force=True, output_exists=_there)
    statuses = sorted(r["status"] for r in lineage.runs("s", "clip"))
    assert statuses == ["done", "superseded"]
    assert [(r.outcome, r.count) for r in lineage.funnel("s")] == [("kept", 1)]


def test_vanished_output_is_not_trusted(lineage_url: str, tmp_path) -> None:
    lineage = Lineage(lineage_url)
    lineage.ensure_snapshot("s", "/data")
    out = tmp_path / "o.parquet"
    out.write_bytes(b"x")
    run = StageRun("s", "extract", "w1", "in", "d")

    def fn() -> ShardStats:
        stats = _stats(kept=1)
        stats.output_uri = str(out)
        return stats

    run_stage(lineage, run, fn, output_exists=lambda uri: __import__("os").path.exists(uri))
    out.unlink()
    _, skipped = run_stage(lineage, run, fn, output_exists=lambda uri: __import__("os").path.exists(uri))
    assert not skipped


def test_postgres_restart_mid_run_is_recovered(postgres, postgres_url: str) -> None:
    """A restart between start and finish: the pooled engine reconnects and records once."""
    lineage = Lineage(postgres_url)
    lineage.ensure_snapshot("s", "/data")

    def fn() -> ShardStats:
        postgres.restart()
        return _stats(kept=4)

    run_stage(lineage, StageRun("s", "extract", "w1", "in", "d"), fn)
    assert [(r["status"], r["attempt"]) for r in lineage.runs("s")] == [("done", 1)]
    assert [(r.outcome, r.count) for r in lineage.funnel("s")] == [("kept", 4)]


def test_postgres_down_at_finish_fails_cleanly_then_retry_records_once(postgres, postgres_url: str) -> None:
    lineage = Lineage(postgres_url)
    lineage.ensure_snapshot("s", "/data")
    run = StageRun("s", "extract", "w1", "in", "d")

    def fn() -> ShardStats:
        postgres.stop("immediate")
        return _stats(kept=4)

    try:
        with pytest.raises(sa.exc.OperationalError):
            run_stage(lineage, run, fn)
    finally:
        postgres.restart()
    # the interrupted attempt stays 'running' (never 'done' without its counts)
    assert [r["status"] for r in lineage.runs("s")] == ["running"]
    assert lineage.funnel("s") == []
    stats, skipped = run_stage(lineage, run, lambda: _stats(kept=4))
    assert not skipped
    with lineage.engine.connect() as conn:
        rows = conn.execute(sa.select(shard_run_table.c.status)).scalars().all()
    assert sorted(rows) == ["done", "running"]
    assert [(r.outcome, r.count) for r in lineage.funnel("s")] == [("kept", 4)]
