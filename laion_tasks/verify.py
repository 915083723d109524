"""``laion verify``: prove that a (finished or half-finished) snapshot is whole.

Checks, each reported as one line naming the stage and the shard:

- **one done run**: exactly one done lineage run per (stage, shard);
- **outputs**: every done run's commit object exists, and a file's sha256 matches the checksum recorded;
- **conservation**: each stage's current generation accounts for every row of its upstream's current
  generation, shard by shard (regroup -> download -> clip / tag / dedup_partition), and each Parquet
  output holds as many rows as its run recorded;
- **dedup coverage**: the dedup verdicts name every downloaded row exactly once, and nothing else;
- **subsets**: every subset accounts for every download row once, and every row a subset wrote is
  eligible under the base checks and its predicate.

A stage that has not run yet is not a problem (a half-finished snapshot verifies); a stage that ran
on part of its upstream's shards is.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
import sqlalchemy as sa

from laion_tasks import layout, storage
from laion_tasks.config import Settings
from laion_tasks.lineage import Lineage, shard_outcome_table, shard_run_table

PER_DOWNLOAD_SHARD = ("clip", "tag", "dedup_partition")
"""Stages with one run per download shard, each accounting for every row of it."""
PARQUET_OUTPUT = {"download": layout.images_parquet_uri, "clip": layout.clip_parquet_uri, "tag": layout.tags_parquet_uri}


@dataclass(frozen=True)
class Problem:
    check: str
    stage: str
    shard: str
    message: str

    def line(self) -> str:
        return f"{self.check}: {self.stage} shard {self.shard}: {self.message}"


def _done_runs(lineage: Lineage, snapshot: str) -> list[dict[str, Any]]:
    """Done runs with their outcome total, in one query."""
    t, o = shard_run_table, shard_outcome_table
    total = sa.select(o.c.run_id, sa.func.sum(o.c.count).label("rows")).group_by(o.c.run_id).subquery()
    query = (
        sa.select(t.c.id, t.c.stage, t.c.shard_id, t.c.output_uri, t.c.checksum, total.c.rows)
        .select_from(t.outerjoin(total, total.c.run_id == t.c.id))
        .where(t.c.snapshot_id == snapshot, t.c.status == "done")
        .order_by(t.c.stage, t.c.shard_id, t.c.id)
    )
    with lineage.engine.connect() as conn:
        return [dict(r, rows=int(r["rows"] or 0)) for r in conn.execute(query).mappings()]


def _is_file(uri: str) -> bool:
    """An object (S3) or a plain file: what a recorded checksum can be about (not a directory output)."""
    return storage.exists(uri) if storage.is_s3(uri) else storage.local_path(uri).is_file()


def _sha256(uri: str) -> str:
    with storage.local_copy(uri) as path:
        return storage.file_sha256(path)


def _parquet_rows(uri: str) -> int | None:
    if not storage.exists(uri):
        return None
    with storage.local_copy(uri) as path:
        return pq.ParquetFile(path).metadata.num_rows


def check_lineage(runs: list[dict[str, Any]]) -> list[Problem]:
    """One done run per (stage, shard); every done run's output exists and matches its checksum."""
    problems = []
    for (stage, shard), n in sorted(Counter((r["stage"], r["shard_id"]) for r in runs).items()):
        if n > 1:
            problems.append(Problem("one done run", stage, shard, f"{n} done runs"))
    for r in runs:
        out = r["output_uri"]
        if not out:
            continue
        if not storage.output_exists(out):
            problems.append(Problem("outputs", r["stage"], r["shard_id"], f"output {out} is missing"))
        elif r["checksum"] and _is_file(out) and _sha256(out) != r["checksum"]:
            problems.append(Problem("outputs", r["stage"], r["shard_id"], f"output {out} does not match its recorded sha256"))
    return problems


def check_conservation(root: str, snapshot: str, runs: list[dict[str, Any]]) -> list[Problem]:
    """Shard by shard, every stage's rows equal its upstream's, and each Parquet output its recorded rows."""
    problems = []
    by_stage: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in runs:
        by_stage[r["stage"]][r["shard_id"]] = r
    downloads = by_stage.get("download", {})
    for shard, run in sorted(downloads.items()):
        planned = _parquet_rows(layout.shard_input_uri(root, snapshot, shard))
        if planned is not None and planned != run["rows"]:
            problems.append(Problem("conservation", "download", shard, f"{run['rows']} rows recorded, {planned} planned"))
    for stage in PER_DOWNLOAD_SHARD:
        runs_of = by_stage.get(stage, {})
        if not runs_of:
            continue  # not run yet
        for shard, run in sorted(downloads.items()):
            if shard not in runs_of:
                problems.append(Problem("conservation", stage, shard, "downloaded, but no done run"))
            elif runs_of[shard]["rows"] != run["rows"]:
                problems.append(Problem("conservation", stage, shard,
                                        f"{runs_of[shard]['rows']} rows, download has {run['rows']}"))
        for shard in sorted(set(runs_of) - set(downloads)):
            problems.append(Problem("conservation", stage, shard, "done, but the shard has no download run"))
    for stage, uri_of in PARQUET_OUTPUT.items():
        for shard, run in sorted(by_stage.get(stage, {}).items()):
            rows = _parquet_rows(uri_of(root, snapshot, shard))
            if rows is not None and rows != run["rows"]:
                problems.append(Problem("conservation", stage, shard, f"parquet has {rows} rows, the run recorded {run['rows']}"))
    return problems


def check_dedup(root: str, snapshot: str, runs: list[dict[str, Any]]) -> list[Problem]:
    """The verdicts under dedup/ name every downloaded row once (by shard and key), and nothing else."""
    if not any(r["stage"] == "dedup" for r in runs):
        return []
    import duckdb

    downloads = sorted(r["shard_id"] for r in runs if r["stage"] == "download")
    con = duckdb.connect()
    problems = []
    verdict_files = {u.rsplit("/", 1)[-1][: -len(".parquet")]: u for u in
                     storage.list_uris(layout.dedup_dir(root, snapshot), ".parquet")}
    for shard in downloads:
        images = layout.images_parquet_uri(root, snapshot, shard)
        if not storage.exists(images):
            continue  # reported by check_lineage
        if shard not in verdict_files:
            problems.append(Problem("dedup coverage", "dedup", shard, "no verdict file"))
            continue
        with storage.local_copy(images) as img, storage.local_copy(verdict_files[shard]) as ver:
            missing, extra, twice = con.execute(
                f"""
                WITH i AS (SELECT key FROM read_parquet('{img}')),
                     v AS (SELECT key, count(*) AS n FROM read_parquet('{ver}') GROUP BY key)
                SELECT (SELECT count(*) FROM i WHERE key NOT IN (SELECT key FROM v)),
                       (SELECT count(*) FROM v WHERE key NOT IN (SELECT key FROM i)),
                       (SELECT count(*) FROM v WHERE n > 1)
                """
            ).fetchone()
        for n, what in ((missing, "downloaded row(s) have no verdict"), (extra, "verdict(s) name no downloaded row"),
                        (twice, "row(s) have more than one verdict")):
            if n:
                problems.append(Problem("dedup coverage", "dedup", shard, f"{n} {what}"))
    for shard in sorted(set(verdict_files) - set(downloads)):
        problems.append(Problem("dedup coverage", "dedup", shard, "a verdict file for a shard that is not downloaded"))
    return problems


def check_subsets(settings: Settings, snapshot: str, runs: list[dict[str, Any]]) -> list[Problem]:
    """Each curated subset accounts for every download row once; each row it wrote is eligible and matches."""
    from laion_tasks.snapshot_db import SAMPLES_VIEW, open_snapshot
    from laion_tasks.stages.curate import eligible_sql, read_manifest

    curated = sorted(r["shard_id"] for r in runs if r["stage"] == "curate")
    if not curated:
        return []
    root = settings.storage.root
    downloaded = sum(r["rows"] for r in runs if r["stage"] == "download")
    problems = []
    with open_snapshot(root, snapshot, settings.curate, settings.clip) as db:
        for name in curated:
            manifest = read_manifest(root, snapshot, name)
            subset = settings.curate.subsets.get(name)
            if manifest is None or subset is None:
                problems.append(Problem("subsets", "curate", name, "no manifest" if manifest is None else "not configured"))
                continue
            if sum(manifest["counts"].values()) != downloaded:
                problems.append(Problem("subsets", "curate", name,
                                        f"counts add up to {sum(manifest['counts'].values())}, download has {downloaded} rows"))
            if manifest["status"] != "ok":
                continue
            out_dir = layout.subset_dir(root, snapshot, name)
            tables = [pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out_dir, p["name"]))), columns=["key"])
                      for p in manifest["parquet"]]
            keys = [k for t in tables for k in t.column("key").to_pylist()]
            if len(keys) != manifest["counts"].get("kept", 0):
                problems.append(Problem("subsets", "curate", name,
                                        f"{len(keys)} rows written, {manifest['counts'].get('kept', 0)} counted kept"))
            if len(set(keys)) != len(keys):
                problems.append(Problem("subsets", "curate", name, f"{len(keys) - len(set(keys))} rows written twice"))
            import pyarrow as pa

            db.con.register("_subset_keys", pa.table({"key": pa.array(keys, pa.string())}))
            bad = db.con.execute(
                f"SELECT k.key, s.shard FROM _subset_keys AS k LEFT JOIN {SAMPLES_VIEW} AS s ON s.key = k.key "
                f"WHERE s.key IS NULL OR NOT coalesce(({eligible_sql(settings.curate)}) AND ({subset.where}), false) "
                f"LIMIT 5"
            ).fetchall()
            db.con.unregister("_subset_keys")
            for key, shard in bad:
                problems.append(Problem("subsets", "curate", name,
                                        f"row {key} (download shard {shard}) is not eligible under the predicate"))
    return problems


def verify_snapshot(settings: Settings, snapshot: str, lineage: Lineage) -> list[Problem]:
    """Every problem found in a snapshot (empty: it verifies)."""
    runs = _done_runs(lineage, snapshot)
    root = settings.storage.root
    return (check_lineage(runs) + check_conservation(root, snapshot, runs) + check_dedup(root, snapshot, runs)
            + check_subsets(settings, snapshot, runs))


VERIFY_STAGE = "verify"


def verify_and_record(settings: Settings, snapshot: str, lineage: Lineage) -> list[Problem]:
    """Verify, and record the result in lineage as a ``verify`` run: done when whole, failed with
    every problem's line otherwise (the lineage view shows it among the failed shards)."""
    problems = verify_snapshot(settings, snapshot, lineage)
    run_id = lineage.start(snapshot, VERIFY_STAGE, "snapshot", layout.snapshot_root(settings.storage.root, snapshot), "-")
    if problems:
        lineage.fail(run_id, f"{len(problems)} problem(s):\n" + "\n".join(p.line() for p in problems))
    else:
        from laion_tasks.stage import ShardStats

        lineage.finish(run_id, ShardStats().done())
    return problems
