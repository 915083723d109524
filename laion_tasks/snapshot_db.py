"""One DuckDB view over a snapshot's per-shard metadata, out of core.

Curation, the dataset card and the index/search stages all ask questions of the same
joined table: a download row (every sample, with its status) plus its CLIP row, its
tags row and its dedup verdict. :func:`open_snapshot` builds that view, named
``samples``, over the Parquet files with ``read_parquet`` globs, so DuckDB streams
them and spills to ``temp_directory`` past ``memory_limit``: nothing loads a whole
snapshot into memory.

Joins: ``images``, ``clip`` and ``tags`` are one file per shard with the same rows, so
they join on (shard, key), where shard is the file's basename. ``dedup/<shard>.parquet``
(one verdict per row) joins on (shard, key) too: exact (url, alt) duplicates share a uid,
so uid cannot tell them apart. Verdict files without ``key`` (an older layout) join on
uid, and a uid counts as a duplicate only if none of its rows is a representative. A
row without a verdict is taken as its own representative.

S3 roots: DuckDB's httpfs extension is not bundled with the Python wheel and cannot be
fetched offline, so for an ``s3://`` root the metadata Parquet files (not the images)
are first copied, streaming and in parallel, into the local temp directory and read
from there. That needs local disk about the size of the snapshot's metadata.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable

import duckdb

from laion_tasks import layout, storage
from laion_tasks.config import ClipConfig, CurateConfig
from laion_tasks.net.usage_prefs import SQL_TYPE as USAGE_PREF_SQL_TYPE
from laion_tasks.stage import StageError

log = logging.getLogger(__name__)

SAMPLES_VIEW = "samples"

# The columns each upstream stage writes, with the DuckDB type the view exposes.
# A column absent from every file of a table shows up as a typed NULL, so a
# predicate over it fails the "entirely null" check instead of a binder error.
IMAGES_COLUMNS: dict[str, str] = {
    "key": "VARCHAR",
    "uid": "VARCHAR",
    "url": "VARCHAR",
    "caption": "VARCHAR",
    "page_url": "VARCHAR",
    "wat_file": "VARCHAR",
    "status": "VARCHAR",
    "error_message": "VARCHAR",
    "width": "BIGINT",
    "height": "BIGINT",
    "original_width": "BIGINT",
    "original_height": "BIGINT",
    "original_bytes": "BIGINT",
    "mime_type": "VARCHAR",
    "sha256": "VARCHAR",
    "final_url": "VARCHAR",
    "usage_pref": USAGE_PREF_SQL_TYPE,  # AI-use preferences found at download (laion_tasks/net/usage_prefs.py)
}
CLIP_COLUMNS: dict[str, str] = {
    "key": "VARCHAR",
    "uid": "VARCHAR",
    "similarity": "DOUBLE",
    "clip_status": "VARCHAR",
    "clip_model": "VARCHAR",
    "language": "VARCHAR",
    "language_score": "DOUBLE",
    "language_group": "VARCHAR",
    "has_embedding": "BOOLEAN",
}
TAGS_COLUMNS: dict[str, str] = {
    "key": "VARCHAR",
    "uid": "VARCHAR",
    "language": "VARCHAR",
    "language_score": "DOUBLE",
    "language_group": "VARCHAR",
    "punsafe": "DOUBLE",
    "nsfw_method": "VARCHAR",
    "nudenet_unsafe": "DOUBLE",
    "pwatermark": "DOUBLE",
    "watermark_method": "VARCHAR",
    "aesthetic_score": "DOUBLE",
    "nsfw_text": "BOOLEAN",
    "pdq": "VARCHAR",
    "hashlist_blocked": "BOOLEAN",
    "tag_status": "VARCHAR",
}
DEDUP_COLUMNS: dict[str, str] = {
    "uid": "VARCHAR",
    "key": "VARCHAR",
    "dup_of": "VARCHAR",
    "dup_of_key": "VARCHAR",
    "dup_of_shard": "VARCHAR",
    "dup_reason": "VARCHAR",
    "rank": "BIGINT",
    "ua1": "UBIGINT",
    "ua2": "UBIGINT",
    "sh1": "UBIGINT",
    "sh2": "UBIGINT",
}

TABLES: dict[str, dict[str, str]] = {
    "images": IMAGES_COLUMNS,
    "clip": CLIP_COLUMNS,
    "tags": TAGS_COLUMNS,
    "dedup": DEDUP_COLUMNS,
}


# Eligibility: who may enter a subset (curate) and represent a duplicate group (dedup's ranks).
# (outcome, SQL condition that makes a sample fail this check), in pipeline order.
BASE_CHECKS: list[tuple[str, str]] = [
    ("drop:not_downloaded", "status IS DISTINCT FROM 'success'"),
    ("drop:not_clip_scored", "similarity IS NULL"),
    ("drop:clip_filtered", "NOT coalesce(clip_kept, false)"),
    ("drop:hashlist_blocked", "coalesce(hashlist_blocked, false)"),
]
ELIGIBLE = "eligible"
BASE_OUTCOMES = [name for name, _ in BASE_CHECKS] + [ELIGIBLE]


def base_checks(config: CurateConfig) -> list[tuple[str, str]]:
    """The checks in force: ``drop:clip_filtered`` only with ``curate.require_clip_kept``."""
    return [(o, cond) for o, cond in BASE_CHECKS if o != "drop:clip_filtered" or config.require_clip_kept]


def base_outcome_sql(config: CurateConfig) -> str:
    """CASE expression giving each sample its first failing base check, else 'eligible'."""
    whens = "\n".join(f"    WHEN {cond} THEN '{outcome}'" for outcome, cond in base_checks(config))
    return f"CASE\n{whens}\n    ELSE '{ELIGIBLE}'\n  END"


def eligible_sql(config: CurateConfig) -> str:
    """Boolean SQL: the sample passes every base check."""
    return " AND ".join(f"NOT coalesce({cond}, false)" for _, cond in base_checks(config))


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def clip_kept_sql(clip: ClipConfig, similarity: str = "similarity", group: str = "clip_language_group") -> str:
    """Boolean SQL: the pair reaches the CLIP threshold of the model that scored it.

    The CLIP stage stores the similarity and the language group that routed the pair;
    the threshold is applied here, at read time, so changing ``clip.*.threshold``
    re-runs curation and dedup, never GPU scoring. NULL when the pair was not scored.
    """
    english = float(clip.english.threshold)
    multi = float(clip.multilingual.threshold if clip.use_multilingual else english)
    return f"({similarity} >= CASE WHEN {group} = 'multi' THEN {multi!r} ELSE {english!r} END)"


def table_dir(root: str, snapshot: str, table: str) -> str:
    return storage.join(layout.snapshot_root(root, snapshot), table)


def _glob_for(base: Path) -> str:
    # Flat by layout; sub-folders (e.g. a stage's work files) are not part of the table.
    return str(base / "*.parquet")


@dataclass
class SnapshotDB:
    """A DuckDB connection with the ``samples`` view of one snapshot (see module doc)."""

    root: str
    snapshot: str
    con: duckdb.DuckDBPyConnection
    files: dict[str, int]
    """Number of Parquet files found per table (images, clip, tags, dedup)."""
    view_sql: str
    """The SQL of the ``samples`` view, for reuse and for the record."""
    work_dir: Path
    clip: ClipConfig | None = None
    """The CLIP settings the view was built with (thresholds; the subset rules embed targets with ``english``)."""
    _owns_work_dir: bool = True
    _closed: bool = field(default=False, repr=False)

    @property
    def columns(self) -> list[str]:
        return [row[0] for row in self.con.execute(f"DESCRIBE {SAMPLES_VIEW}").fetchall()]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.con.close()
        if self._owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "SnapshotDB":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect_duckdb(config: CurateConfig, work_dir: Path) -> duckdb.DuckDBPyConnection:
    """The snapshot's DuckDB (:func:`laion_tasks.duck.connect`), spilling to ``work_dir/spill``."""
    from laion_tasks import duck

    return duck.connect(config.duckdb_memory_limit, work_dir / "spill", config.duckdb_threads)


def _stage_s3_table(prefix: str, dest: Path, parallel: int = 8) -> int:
    """Copy every ``.parquet`` object under ``prefix`` into ``dest``, keeping relative paths."""
    uris = storage.list_uris(prefix, ".parquet")
    base = prefix.rstrip("/") + "/"

    def fetch(uri: str) -> None:
        rel = uri[len(base) :]
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with storage.open_read(uri) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(fetch, uris))
    return len(uris)


def _local_table_files(directory: Path, table: str) -> int:
    if not directory.is_dir():
        return 0
    return sum(1 for p in directory.glob("*.parquet") if p.is_file() and not p.name.startswith("."))


def _table_select(con: duckdb.DuckDBPyConnection, table: str, glob: str | None) -> tuple[str, set[str]]:
    """``SELECT`` of one table with ``shard`` + exactly the expected columns, typed (empty when
    no files), and the set of columns the files really have."""
    wanted = TABLES[table]
    if glob is None:
        cols = ", ".join(f"NULL::{typ} AS {name}" for name, typ in wanted.items())
        return f"SELECT NULL::VARCHAR AS shard, {cols} WHERE false", set()
    source = f"read_parquet({_sql_str(glob)}, filename = true, union_by_name = true)"
    try:
        present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    except duckdb.Error as exc:
        raise StageError(f"reading {table} parquet {glob}: {exc}") from exc
    if "key" not in present and table != "dedup":
        raise StageError(f"{table} parquet {glob} has no 'key' column (columns: {sorted(present)})")
    cols = ", ".join(
        f"CAST({name} AS {typ}) AS {name}" if name in present else f"NULL::{typ} AS {name}"
        for name, typ in wanted.items()
    )
    shard = "regexp_extract(filename, '([^/\\\\]+)\\.parquet$', 1)"
    if table == "dedup" and "shard" in present:
        shard = f"coalesce(CAST(shard AS VARCHAR), {shard})"
    return f"SELECT {shard} AS shard, {cols} FROM {source}", present


def build_view_sql(dedup_on_key: bool = True, clip: ClipConfig | None = None) -> str:
    """The ``samples`` view over the four table views (``images``, ``clip``, ``tags``, ``dedup_one``).

    ``clip_kept`` applies the configured CLIP thresholds (``clip.*.threshold``) to the stored
    similarity, by the language group that routed the pair to its model.
    """
    kept = clip_kept_sql(clip or ClipConfig(), "c.similarity", "c.language_group")
    dedup_join = "d.shard = i.shard AND d.key = i.key" if dedup_on_key else "d.uid = i.uid"
    image_cols = ", ".join(f"i.{c}" for c in IMAGES_COLUMNS)
    return f"""
SELECT
  i.shard, {image_cols},
  c.similarity, c.clip_status, c.clip_model, c.has_embedding,
  c.language_group AS clip_language_group, {kept} AS clip_kept,
  coalesce(t.language, c.language) AS language,
  coalesce(t.language_score, c.language_score) AS language_score,
  coalesce(t.language_group, c.language_group) AS language_group,
  t.punsafe, t.nsfw_method, t.nudenet_unsafe, t.pwatermark, t.watermark_method, t.aesthetic_score,
  t.nsfw_text, t.pdq, t.tag_status,
  coalesce(t.hashlist_blocked, false) OR coalesce(t.tag_status = 'blocked_hashlist', false) AS hashlist_blocked,
  d.dup_of, d.dup_reason,
  d.rank AS dedup_rank, d.ua1 AS dedup_ua1, d.ua2 AS dedup_ua2, d.sh1 AS dedup_sh1, d.sh2 AS dedup_sh2,
  c.key IS NOT NULL AS has_clip_row,
  t.key IS NOT NULL AS has_tags_row
FROM images AS i
LEFT JOIN clip AS c ON c.shard = i.shard AND c.key = i.key
LEFT JOIN tags AS t ON t.shard = i.shard AND t.key = i.key
LEFT JOIN dedup_one AS d ON {dedup_join}
"""


def open_snapshot(
    root: str, snapshot: str, config: CurateConfig | None = None, clip: ClipConfig | None = None
) -> SnapshotDB:
    """Open the ``samples`` view of a snapshot (local or s3:// root). Close it when done.

    ``clip`` gives the CLIP thresholds behind ``clip_kept`` (default: ClipConfig()'s).
    """
    config = config or CurateConfig()
    base_tmp = Path(config.duckdb_temp_dir) if config.duckdb_temp_dir else None
    if base_tmp is not None:
        base_tmp.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="laion-snapshot-", dir=base_tmp))
    try:
        con = connect_duckdb(config, work_dir)
        files: dict[str, int] = {}
        present: dict[str, set[str]] = {}
        for table in TABLES:
            remote = table_dir(root, snapshot, table)
            if storage.is_s3(remote):
                local = work_dir / "staged" / table
                files[table] = _stage_s3_table(remote, local)
            else:
                local = storage.local_path(remote)
                files[table] = _local_table_files(local, table)
            select, present[table] = _table_select(con, table, _glob_for(local) if files[table] else None)
            con.execute(f"CREATE VIEW {table} AS {select}")
        if files["images"] == 0:
            raise StageError(f"no download parquet under {table_dir(root, snapshot, 'images')}")
        # One verdict per joined row, so the join never multiplies rows.
        dedup_on_key = "key" in present["dedup"] or files["dedup"] == 0
        if dedup_on_key:
            con.execute(
                "CREATE VIEW dedup_one AS SELECT shard, key, min(dup_of) AS dup_of, min(dup_reason) AS dup_reason, "
                "min(rank) AS rank, min(ua1) AS ua1, min(ua2) AS ua2, min(sh1) AS sh1, min(sh2) AS sh2 "
                "FROM dedup WHERE key IS NOT NULL GROUP BY shard, key"
            )
        else:
            con.execute(
                "CREATE VIEW dedup_one AS SELECT uid, "
                "CASE WHEN bool_or(dup_of IS NULL) THEN NULL ELSE min(dup_of) END AS dup_of, "
                "CASE WHEN bool_or(dup_of IS NULL) THEN NULL ELSE min(dup_reason) END AS dup_reason, "
                "NULL::BIGINT AS rank, NULL::UBIGINT AS ua1, NULL::UBIGINT AS ua2, NULL::UBIGINT AS sh1, "
                "NULL::UBIGINT AS sh2 FROM dedup WHERE uid IS NOT NULL GROUP BY uid"
            )
        view_sql = build_view_sql(dedup_on_key, clip)
        con.execute(f"CREATE VIEW {SAMPLES_VIEW} AS {view_sql}")
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    log.info("snapshot %s/%s: parquet files %s", root, snapshot, files)
    return SnapshotDB(root=root, snapshot=snapshot, con=con, files=files, view_sql=view_sql, work_dir=work_dir, clip=clip)


# -- predicates ---------------------------------------------------------------


def _walk(node: Any) -> Iterable[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def predicate_columns(con: duckdb.DuckDBPyConnection, where: str) -> set[str]:
    """The column names a SQL predicate references, parsed by DuckDB itself.

    Rejects anything but a single boolean expression: several statements, subqueries
    and table references are errors, so a subset predicate cannot read other data.
    """
    (serialized,) = con.execute(
        "SELECT json_serialize_sql(?)", [f"SELECT 1 FROM {SAMPLES_VIEW} WHERE ({where})"]
    ).fetchone()
    tree = json.loads(serialized)
    if tree.get("error"):
        raise ValueError(f"predicate {where!r} does not parse: {tree.get('error_message')}")
    statements = tree.get("statements", [])
    if len(statements) != 1:
        raise ValueError(f"predicate {where!r} must be a single expression")
    where_clause = statements[0]["node"].get("where_clause")
    columns: set[str] = set()
    for node in _walk(where_clause):
        if node.get("class") == "SUBQUERY" or node.get("type") in ("BASE_TABLE", "SELECT_NODE"):
            raise ValueError(f"predicate {where!r} may not contain subqueries")
        if node.get("class") == "COLUMN_REF":
            columns.add(str(node["column_names"][-1]).lower())
    return columns
