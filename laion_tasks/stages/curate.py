"""Curate: evaluate each configured subset's predicate over a snapshot, out of core.

Who enters a subset (checked in this order; the first failing check is the sample's
drop reason, so every download row lands in exactly one outcome):

1. ``drop:not_downloaded``   download ``status`` is not ``'success'``;
2. ``drop:not_clip_scored``  no CLIP similarity (no clip row, or no_image / decode_error / empty_caption);
3. ``drop:clip_filtered``    below the CLIP threshold of the model that scored it (``clip.english.threshold``
                             or ``clip.multilingual.threshold``, applied here, not in the GPU stage), when
                             ``curate.require_clip_kept`` (default: LAION subsets are subsets of LAION-5B);
4. ``drop:hashlist_blocked`` the tag stage matched a URL / image hash list;
5. ``drop:predicate``        the subset predicate is not true (NULL counts as false);
   ``drop:usage_pref``        the publisher refuses one of the subset's ``intended_uses`` (the ``usage_pref``
                             the download stage recorded: AIPREF ``Content-Usage``, ``Content-Signal``);
   then the subset's DataComp rules, if set (``drop:text_language``, ``drop:text_class``,
   ``drop:clip_score``, ``drop:image_cluster``: :mod:`laion_tasks.stages.subset_rules`);
6. ``drop:duplicate``        a duplicate of a sample kept *in this subset*: dedup's rules
                             (:func:`laion_tasks.stages.dedup.resolve_verdicts`) applied to the rows
                             that pass 1-5, so a duplicate group keeps one member in every subset
                             that any of its members qualifies for;
7. ``kept``.

A subset whose predicate reads a column that is NULL for every eligible sample
(``aesthetic_score`` without aesthetic weights) is ``unavailable``: the eligible rows
count as ``drop:unavailable``, the manifest says why, and no data files are written.

Output under ``subsets/<name>/``: ``part-NNNNN.parquet`` in LAION's column layout (see
:data:`LAION_COLUMNS_SQL`), ordered by (shard, key), ``rows_per_file`` rows each;
optionally ``webdataset/NNNNN.tar`` + ``sizes.json`` for open_clip; and last
``manifest.json``, the commit point (deleted first, so a crash leaves none).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import layout, storage
from laion_tasks.config import ClipConfig, CurateConfig, SubsetConfig
from laion_tasks.net.usage_prefs import ROW_FIELDS
from laion_tasks.snapshot_db import (  # noqa: F401 - eligibility is defined with the samples view
    BASE_OUTCOMES,
    ELIGIBLE,
    base_checks,
    base_outcome_sql,
    eligible_sql,
)
from laion_tasks.snapshot_db import SAMPLES_VIEW, SnapshotDB, open_snapshot, predicate_columns
from laion_tasks.stage import Context, ShardStats, StageError, StageSpec
from laion_tasks.wds import iter_samples
from laion_tasks.stages.subset_rules import apply_rules

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WDS_DIR = "webdataset"
PART_RE = re.compile(r"^part-\d{5,}\.parquet$")
TAR_RE = re.compile(r"^\d{5,}\.tar$")

HASH_DEFINITION = (
    "hash: signed 64-bit integer = the first 8 bytes (big-endian) of SHA-256 over the UTF-8 of URL || TEXT "
    "(no separator). LAION's column was a 64-bit hash of url+text too, but with a different function: "
    "compare hashes only within data curated by this pipeline."
)

# LAION's parquet layout (URL, TEXT, WIDTH, HEIGHT, similarity, LANGUAGE, punsafe, pwatermark,
# aesthetic, hash) plus ours. WIDTH/HEIGHT are the original image's, as in LAION.
LAION_COLUMNS_SQL = """
  url AS "URL",
  caption AS "TEXT",
  original_width AS "WIDTH",
  original_height AS "HEIGHT",
  similarity,
  language AS "LANGUAGE",
  punsafe,
  pwatermark,
  aesthetic_score AS aesthetic,
  CAST(CASE WHEN h64 >= 9223372036854775808 THEN h64::HUGEINT - 18446744073709551616
            ELSE h64::HUGEINT END AS BIGINT) AS hash,
  sha256,
  status,
  key,
  uid
"""
LAION_COLUMNS = [
    "URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "LANGUAGE", "punsafe", "pwatermark", "aesthetic",
    "hash", "sha256", "status", "key", "uid",
]  # fmt: skip

# Where to look when a column is entirely NULL.
_NULL_HINTS = {
    "aesthetic_score": "no aesthetic predictor weights configured (tag.aesthetic_weights)",
    "punsafe": "no safety scores (tag.nsfw_weights or CLIP prompts) were computed",
    "pwatermark": "no watermark scores (tag.watermark_weights or CLIP prompts) were computed",
}


def laion_hash(url: str, text: str) -> int:
    """The ``hash`` column for one pair, as the SQL computes it (for tests and consumers)."""
    digest = hashlib.sha256((url + text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass
class SubsetCounts:
    """Counts of a snapshot against the configured subsets, from one scan."""

    base: dict[str, int]
    """Samples per base outcome (``drop:...`` and ``eligible``); sums to the download rows."""
    matched: dict[str, int]
    """Eligible samples matching each subset's predicate."""
    duplicates: dict[str, int] = field(default_factory=dict)
    """Of those, the duplicates of another sample kept in the same subset."""
    snapshot_duplicates: int = 0
    """Eligible samples that dedup's snapshot-wide verdict names a duplicate (``dup_of``)."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Subset name -> why it cannot be computed."""
    rule_drops: dict[str, dict[str, int]] = field(default_factory=dict)
    """Of the matched samples, those each subset rule dropped (before dedup)."""
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Subset name -> what its rules decided (threshold and model, clusters hit, classes)."""
    usage_drops: dict[str, int] = field(default_factory=dict)
    """Of the matched samples, those whose publisher refuses one of the subset's ``intended_uses``."""

    @property
    def total(self) -> int:
        return sum(self.base.values())

    @property
    def eligible(self) -> int:
        return self.base.get(ELIGIBLE, 0)

    def outcomes(self, name: str) -> dict[str, int]:
        """Per-sample outcomes for one subset; they sum to :attr:`total`."""
        out = {k: v for k, v in self.base.items() if k != ELIGIBLE and v}
        if name in self.unavailable:
            out["drop:unavailable"] = self.eligible
        else:
            matched, duplicates = self.matched.get(name, 0), self.duplicates.get(name, 0)
            ruled = self.rule_drops.get(name, {})
            refused = self.usage_drops.get(name, 0)
            out["drop:predicate"] = self.eligible - matched
            out["drop:usage_pref"] = refused
            out.update(ruled)
            out["drop:duplicate"] = duplicates
            out["kept"] = matched - refused - sum(ruled.values()) - duplicates
        return {k: v for k, v in out.items() if v}


def _validated_columns(db: SnapshotDB, name: str, subset: SubsetConfig) -> set[str]:
    try:
        columns = predicate_columns(db.con, subset.where)
    except ValueError as exc:
        raise StageError(f"subset {name}: {exc}") from exc
    known = set(db.columns)
    unknown = sorted(columns - known)
    if unknown:
        raise StageError(
            f"subset {name}: predicate {subset.where!r} uses unknown column(s) {unknown}; "
            f"available: {sorted(known)}"
        )
    try:
        db.con.execute(f"SELECT count(*) FROM (SELECT * FROM {SAMPLES_VIEW} LIMIT 0) WHERE ({subset.where})")
    except Exception as exc:  # duckdb binder/type errors
        raise StageError(f"subset {name}: predicate {subset.where!r} is invalid: {exc}") from exc
    return columns


def _tally(
    rows: list[tuple], subsets: dict[str, SubsetConfig], columns: list[str], columns_by_subset: dict[str, set[str]], config: CurateConfig
) -> SubsetCounts:
    """Turn the per-base-outcome rows of a scan (count, one match count per subset, one non-NULL count
    per predicate column) into counts; a subset whose predicate column is NULL for every eligible
    sample is ``unavailable``, not silently empty."""
    base = {o: 0 for o in BASE_OUTCOMES if o != "drop:clip_filtered" or config.require_clip_kept}
    matched = {name: 0 for name in subsets}
    nonnull_eligible = {c: 0 for c in columns}
    for row in rows:
        base[row[0]] = int(row[1])
        if row[0] != ELIGIBLE:
            continue
        for i, name in enumerate(subsets):
            matched[name] = int(row[2 + i])
        for i, c in enumerate(columns):
            nonnull_eligible[c] = int(row[2 + len(subsets) + i])
    eligible = base[ELIGIBLE]
    unavailable: dict[str, str] = {}
    for name, cols in columns_by_subset.items():
        empty = sorted(c for c in cols if nonnull_eligible[c] == 0)
        if eligible and empty:
            hints = "; ".join(_NULL_HINTS[c] for c in empty if c in _NULL_HINTS)
            unavailable[name] = (
                f"column(s) {', '.join(empty)} are NULL for all {eligible} eligible samples"
                + (f": {hints}" if hints else "")
            )
    return SubsetCounts(base=base, matched=matched, unavailable=unavailable)


def count_subsets(db: SnapshotDB, subsets: dict[str, SubsetConfig], config: CurateConfig) -> SubsetCounts:
    """Base outcomes, per-subset matches and duplicates, from the same scan a curate run does."""
    try:
        return _scan_snapshot(db, subsets, config)[0]
    finally:
        db.con.execute(f"DROP TABLE IF EXISTS {SCAN_TABLE}")


def subset_counts(
    root: str, snapshot: str, config: CurateConfig, *, db: SnapshotDB | None = None, clip: ClipConfig | None = None
) -> SubsetCounts:
    """Counts for every configured subset without writing anything (for the card and `laion curate --dry-run`)."""
    if db is not None:
        return count_subsets(db, config.subsets, config)
    with open_snapshot(root, snapshot, config, clip) as own:
        return count_subsets(own, config.subsets, config)


# -- writing -------------------------------------------------------------------


SCAN_TABLE = "curate_scan"


def _scan_snapshot(db: SnapshotDB, subsets: dict[str, SubsetConfig], config: CurateConfig) -> tuple[SubsetCounts, list[str]]:
    """The one scan of a run: materialise what every subset needs into ``curate_scan``; count from it.

    Per sample: its base outcome, one flag per subset (``s0``, ``s1``, ...) and one non-NULL flag per
    predicate column; the LAION columns only for eligible samples that enter some subset (NULL
    otherwise, which DuckDB stores for almost nothing). The table lives in DuckDB's buffer pool
    and spills to the temp directory beyond ``duckdb_memory_limit``.
    """
    columns_by_subset = {name: _validated_columns(db, name, s) for name, s in subsets.items()}
    columns = sorted(set().union(*columns_by_subset.values())) if subsets else []
    flags = [f"coalesce(({s.where}), false) AS s{i}" for i, s in enumerate(subsets.values())]
    nonnull = [f"{c} IS NOT NULL AS n{i}" for i, c in enumerate(columns)]
    any_subset = " OR ".join(f"s{i}" for i in range(len(subsets))) or "false"
    keep = f"base_outcome = '{ELIGIBLE}' AND ({any_subset})"
    laion = ", ".join(f'CASE WHEN {keep} THEN "{c}" END AS "{c}"' for c in LAION_COLUMNS)
    inner = ", ".join(["base_outcome", *[f"s{i}" for i in range(len(subsets))], *[f"n{i}" for i in range(len(columns))]])
    db.con.execute(f"DROP TABLE IF EXISTS {SCAN_TABLE}")
    db.con.execute(
        f"""
        CREATE TEMP TABLE {SCAN_TABLE} AS
        SELECT {inner}, {keep} AS keep, CASE WHEN {keep} THEN shard END AS _shard, {laion},
               CASE WHEN {keep} THEN dedup_rank END AS _rank, CASE WHEN {keep} THEN dedup_ua1 END AS _ua1,
               CASE WHEN {keep} THEN dedup_ua2 END AS _ua2, CASE WHEN {keep} THEN dedup_sh1 END AS _sh1,
               CASE WHEN {keep} THEN dedup_sh2 END AS _sh2, {keep} AND dup_of IS NOT NULL AS _dup,
               dup_of IS NOT NULL AS _dup_any, CASE WHEN {keep} THEN usage_pref END AS _usage
        FROM (
          SELECT {base_outcome_sql(config)} AS base_outcome, {", ".join(flags + nonnull) or "NULL AS _none"},
                 shard, {LAION_COLUMNS_SQL}, dedup_rank, dedup_ua1, dedup_ua2, dedup_sh1, dedup_sh2, dup_of, usage_pref
          FROM (SELECT *, ('0x' || substr(sha256(coalesce(url, '') || coalesce(caption, '')), 1, 16))::UBIGINT AS h64
                FROM {SAMPLES_VIEW})
        )
        """
    )
    sums = [f"count_if(s{i})" for i in range(len(subsets))] + [f"count_if(n{i})" for i in range(len(columns))]
    rows = db.con.execute(
        f"SELECT base_outcome, {', '.join(['count(*)'] + sums)} FROM {SCAN_TABLE} GROUP BY base_outcome"
    ).fetchall()
    counts = _tally(rows, subsets, columns, columns_by_subset, config)
    counts.snapshot_duplicates = int(db.con.execute(
        f"SELECT count(*) FROM {SCAN_TABLE} WHERE base_outcome = '{ELIGIBLE}' AND _dup_any").fetchall()[0][0])
    counts.usage_drops = _drop_refused_uses(db, subsets, skip=set(counts.unavailable))  # narrows s<i>, before the rules
    ruled = apply_rules(db, SCAN_TABLE, subsets, config, skip=set(counts.unavailable))  # narrows s<i> before dedup
    counts.rule_drops, counts.rules = {n: r.drops for n, r in ruled.items()}, {n: r.record for n, r in ruled.items()}
    counts.duplicates = _dedup_within_subsets(db, list(subsets))
    return counts, [f"s{i}" for i in range(len(subsets))]


def _drop_refused_uses(db: SnapshotDB, subsets: dict[str, SubsetConfig], skip: set[str]) -> dict[str, int]:
    """Clear the flag ``s<i>`` of every eligible sample whose ``usage_pref`` says ``n`` for one of subset i's
    ``intended_uses`` (``drop:usage_pref``); return how many each subset lost. Rows the download stage
    already refused (``download.usage_pref_refuse``) never get here: they are ``drop:not_downloaded``."""
    out: dict[str, int] = {}
    for i, (name, subset) in enumerate(subsets.items()):
        if name in skip or not subset.intended_uses:
            continue
        refused = " OR ".join(f"_usage.{ROW_FIELDS[use]} = 'n'" for use in subset.intended_uses)
        cond = f"base_outcome = '{ELIGIBLE}' AND s{i} AND coalesce({refused}, false)"
        out[name] = int(db.con.execute(f"SELECT count(*) FROM {SCAN_TABLE} WHERE {cond}").fetchall()[0][0])
        if out[name]:
            db.con.execute(f"UPDATE {SCAN_TABLE} SET s{i} = false WHERE {cond}")
    return out


def _dedup_within_subsets(db: SnapshotDB, names: list[str]) -> dict[str, int]:
    """Clear the flag ``s<i>`` of every sample that is a duplicate of another sample of subset i.

    Dedup's rules run on the subset's own rows (eligible and matching), so the representative of a
    group is always a member of the subset when any member is. Without dedup's ranks (dedup not run,
    or written by an older version), dedup's snapshot-wide verdict (``dup_of``) stands.
    """
    from laion_tasks.stages.dedup import pairs_uri, resolve_verdicts, work_dir_for

    out: dict[str, int] = {}
    eligible = f"base_outcome = '{ELIGIBLE}'"
    has_ranks = db.con.execute(f"SELECT count(_rank) > 0 FROM {SCAN_TABLE}").fetchall()[0][0]
    pairs = pairs_uri(work_dir_for(db.root, db.snapshot))
    with contextlib.ExitStack() as stack:
        if has_ranks and storage.exists(pairs):
            local = str(stack.enter_context(storage.local_copy(pairs))).replace("'", "''")
            edges = f"SELECT rank, dup FROM read_parquet('{local}')"
        else:
            edges = "SELECT NULL::BIGINT AS rank, NULL::BIGINT AS dup WHERE false"
        for i, _name in enumerate(names):
            flag = f"s{i}"
            if has_ranks:
                resolve_verdicts(db.con, f"SELECT _rank AS rank, _ua1 AS ua1, _ua2 AS ua2, _sh1 AS sh1, _sh2 AS sh2 "
                                         f"FROM {SCAN_TABLE} WHERE {eligible} AND {flag}", edges)
                dropped = "_rank IN (SELECT rank FROM dd)"
            else:
                dropped = "_dup"
            n = db.con.execute(f"SELECT count(*) FROM {SCAN_TABLE} WHERE {eligible} AND {flag} AND {dropped}").fetchall()[0][0]
            db.con.execute(f"UPDATE {SCAN_TABLE} SET {flag} = false WHERE {eligible} AND {flag} AND {dropped}")
            out[_name] = int(n)
    db.con.execute(f"UPDATE {SCAN_TABLE} SET keep = false WHERE keep AND NOT ({' OR '.join(f's{i}' for i in range(len(names))) or 'false'})")
    return out


class _RollingParquetWriter:
    """``part-NNNNN.parquet`` files of at most ``rows_per_file`` rows, each committed atomically."""

    def __init__(self, out_dir: str, schema: pa.Schema, rows_per_file: int) -> None:
        self.out_dir, self.schema, self.rows_per_file = out_dir, schema, max(1, rows_per_file)
        self.parts: list[dict[str, Any]] = []
        self._ctx: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._rows = 0

    def _open(self) -> None:
        name = f"part-{len(self.parts):05d}.parquet"
        self._ctx = storage.atomic_local_path(storage.join(self.out_dir, name), suffix=".parquet")
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._rows = 0
        self.parts.append({"name": name, "rows": 0, "bytes": 0})

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None or self._rows >= self.rows_per_file:
                self.close_current()
                self._open()
            assert self._writer is not None
            room = self.rows_per_file - self._rows
            chunk, table = table.slice(0, room), table.slice(room)
            self._writer.write_table(chunk)
            self._rows += chunk.num_rows
            self.parts[-1]["rows"] = self._rows

    def close_current(self, exc: BaseException | None = None) -> None:
        if self._writer is None:
            return
        self._writer.close()
        assert self._tmp is not None
        if exc is None:
            self.parts[-1]["bytes"] = self._tmp.stat().st_size
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
        self._writer = self._ctx = None

    def finish(self) -> list[dict[str, Any]]:
        if not self.parts:  # an empty subset still gets one empty part with the schema
            self._open()
        self.close_current()
        return self.parts


def _write_parquet_parts(db: SnapshotDB, out_dirs: dict[str, str], flags: dict[str, str], config: CurateConfig) -> dict[str, list[dict[str, Any]]]:
    """One ordered read of the scan table, each batch routed to every subset it belongs to."""
    cols = ", ".join(f'"{c}"' for c in LAION_COLUMNS)
    chosen = list(out_dirs)
    reader = db.con.sql(
        f"SELECT {cols}, {', '.join(flags[n] for n in chosen)} FROM {SCAN_TABLE} WHERE keep ORDER BY _shard, key"
    ).to_arrow_reader(65_536)
    schema = pa.schema([reader.schema.field(c) for c in LAION_COLUMNS])
    writers = {n: _RollingParquetWriter(out_dirs[n], schema, config.rows_per_file) for n in chosen}
    try:
        for batch in reader:
            table = pa.Table.from_batches([batch])
            data = table.select(LAION_COLUMNS)
            for name in chosen:
                writers[name].write(data.filter(table.column(flags[name])))
        return {n: w.finish() for n, w in writers.items()}
    except BaseException as exc:
        for w in writers.values():
            w.close_current(exc)
        raise


class _RollingTarWriter:
    """Writes samples into ``NNNNN.tar`` files of at most ``per_tar`` samples, each committed atomically."""

    def __init__(self, out_dir: str, per_tar: int) -> None:
        self.out_dir = out_dir
        self.per_tar = max(1, per_tar)
        self.sizes: dict[str, int] = {}
        self.bytes_written = 0
        self._ctx: Any = None
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._name = ""
        self._count = 0

    def _open(self) -> None:
        self._name = f"{len(self.sizes):05d}.tar"
        self._ctx = storage.atomic_local_path(storage.join(self.out_dir, self._name), suffix=".tar")
        self._tmp = self._ctx.__enter__()
        self._tar = tarfile.open(self._tmp, "w")
        self._count = 0
        self.sizes[self._name] = 0

    def add_sample(self, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        if self._tar is None or self._count >= self.per_tar:
            self.close_current()
            self._open()
        assert self._tar is not None
        for info, data in members:
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.sizes[self._name] = self._count

    def close_current(self, exc: BaseException | None = None) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp is not None
        self.bytes_written += self._tmp.stat().st_size if exc is None else 0
        ctx, self._ctx, self._tar = self._ctx, None, None
        if exc is None:
            ctx.__exit__(None, None, None)
        else:
            ctx.__exit__(type(exc), exc, exc.__traceback__)


def _iter_subset_keys_by_shard(db: SnapshotDB, flag: str) -> Iterator[tuple[str, set[str]]]:
    """(shard, keys) of one subset from the scan table, a batch at a time."""
    reader = db.con.sql(f"SELECT _shard, key FROM {SCAN_TABLE} WHERE keep AND {flag} ORDER BY _shard, key").to_arrow_reader(65_536)
    shard: str | None = None
    keys: set[str] = set()
    for batch in reader:
        shards = batch.column(0).to_numpy(zero_copy_only=False)
        cuts = [0, *(int(i) + 1 for i in (shards[1:] != shards[:-1]).nonzero()[0]), len(shards)]
        names = batch.column(1).to_pylist()
        for a, b in zip(cuts[:-1], cuts[1:]):
            if a == b:
                continue
            if shards[a] != shard:
                if shard is not None:
                    yield shard, keys
                shard, keys = str(shards[a]), set()
            keys.update(names[a:b])
    if shard is not None:
        yield shard, keys


def _write_webdataset(db: SnapshotDB, out_dir: str, flag: str, config: CurateConfig) -> dict[str, Any]:
    """Copy the subset's samples (all their files: jpg, txt, json) out of the download tars."""
    wds_dir = storage.join(out_dir, WDS_DIR)
    writer = _RollingTarWriter(wds_dir, config.samples_per_tar)
    missing = 0
    try:
        for shard, keys in _iter_subset_keys_by_shard(db, flag):
            tar_uri = layout.images_tar_uri(db.root, db.snapshot, shard)
            found: set[str] = set()
            try:
                with storage.open_read(tar_uri) as handle:
                    for key, members in iter_samples(handle, keys):
                        if key in found:
                            continue
                        found.add(key)
                        writer.add_sample(members)
            except (storage.StorageError, tarfile.TarError) as exc:
                raise StageError(f"reading images tar {tar_uri} for shard {shard}: {exc}") from exc
            if len(found) < len(keys):
                missing += len(keys) - len(found)
                log.warning("%s: %d subset samples have no image in the tar", tar_uri, len(keys) - len(found))
        writer.close_current()
    except BaseException as exc:
        writer.close_current(exc)
        raise
    sizes = writer.sizes
    storage.write_bytes(storage.join(wds_dir, "sizes.json"), json.dumps(sizes, indent=1, sort_keys=True).encode())
    names = sorted(sizes)
    train_data = f"{{{names[0][:-4]}..{names[-1][:-4]}}}.tar" if names else ""
    return {
        "dir": WDS_DIR,
        "shards": [{"name": n, "samples": sizes[n]} for n in names],
        "samples": sum(sizes.values()),
        "missing_images": missing,
        "train_data": f"{WDS_DIR}/{train_data}" if names else "",
        "bytes": writer.bytes_written,
    }


def _remove_stale(out_dir: str, keep: set[str]) -> None:
    """Delete data files of an earlier run that this run did not write (fewer parts now)."""
    prefix = out_dir.rstrip("/")
    for uri in storage.list_uris(out_dir):
        rel = uri[len(prefix) + 1 :].replace("\\", "/")
        name = rel.rsplit("/", 1)[-1]
        is_part = "/" not in rel and PART_RE.match(name)
        is_tar = rel.startswith(f"{WDS_DIR}/") and (TAR_RE.match(name) or name == "sizes.json")
        if (is_part or is_tar) and rel not in keep:
            storage.delete(uri)


def curate_subsets(db: SnapshotDB, subsets: dict[str, SubsetConfig], config: CurateConfig) -> dict[str, ShardStats]:
    """Write several subsets from one scan of the snapshot; return each one's per-sample outcomes.

    Each subset's outcomes sum to the snapshot's download rows. ``stats.extra`` holds
    ``status`` (``ok`` | ``unavailable``), ``reason``, ``rows`` and the files.
    """
    root, snapshot = db.root, db.snapshot
    out_dirs = {name: layout.subset_dir(root, snapshot, name) for name in subsets}
    for out_dir in out_dirs.values():
        manifest_uri = storage.join(out_dir, MANIFEST)
        if storage.exists(manifest_uri):
            storage.delete(manifest_uri)  # until the new manifest lands, the subset reads as not done
    counts, flag_names = _scan_snapshot(db, subsets, config)
    flags = dict(zip(subsets, flag_names))
    available = [n for n in subsets if n not in counts.unavailable]
    parts = _write_parquet_parts(db, {n: out_dirs[n] for n in available}, flags, config) if available else {}
    results: dict[str, ShardStats] = {}
    for name, subset in subsets.items():
        out_dir = out_dirs[name]
        outcomes = counts.outcomes(name)
        stats = ShardStats(counts=Counter(outcomes))
        manifest: dict[str, Any] = {
            "subset": name,
            "snapshot": snapshot,
            "where": subset.where,
            "description": subset.description,
            "require_clip_kept": config.require_clip_kept,
            "intended_uses": list(subset.intended_uses),
            "counts": dict(sorted(outcomes.items())),
            "total_samples": counts.total,
            **({"rules": counts.rules[name]} if name in counts.rules else {}),
        }
        keep: set[str] = set()
        if name in counts.unavailable:
            manifest.update(status="unavailable", reason=counts.unavailable[name], rows=0, parquet=[])
            log.warning("subset %s unavailable: %s", name, counts.unavailable[name])
        else:
            written = parts[name]
            rows = sum(p["rows"] for p in written)
            if rows != outcomes.get("kept", 0):
                raise StageError(f"subset {name}: wrote {rows} rows but counted {outcomes.get('kept', 0)} kept samples")
            keep |= {p["name"] for p in written}
            stats.bytes_written += sum(p["bytes"] for p in written)
            manifest.update(
                status="ok",
                reason=None,
                rows=rows,
                columns=LAION_COLUMNS,
                hash=HASH_DEFINITION,
                parquet=[{"name": p["name"], "rows": p["rows"]} for p in written],
            )
            if subset.write_images:
                wds = _write_webdataset(db, out_dir, flags[name], config)
                keep |= {f"{WDS_DIR}/{s['name']}" for s in wds["shards"]} | {f"{WDS_DIR}/sizes.json"}
                stats.bytes_written += wds.pop("bytes")
                manifest["webdataset"] = wds
        _remove_stale(out_dir, keep)
        blob = json.dumps(manifest, indent=2, sort_keys=True).encode()
        manifest_uri = storage.join(out_dir, MANIFEST)
        storage.write_bytes(manifest_uri, blob)
        stats.output_uri = manifest_uri
        stats.checksum = hashlib.sha256(blob).hexdigest()
        stats.extra = {
            "status": manifest["status"],
            "reason": manifest["reason"],
            "rows": manifest["rows"],
            "files": len(manifest["parquet"]),
            **({"webdataset_samples": manifest["webdataset"]["samples"]} if "webdataset" in manifest else {}),
        }
        results[name] = stats
    db.con.execute(f"DROP TABLE IF EXISTS {SCAN_TABLE}")
    return results


def curate_subset(
    root: str,
    snapshot: str,
    name: str,
    subset: SubsetConfig,
    config: CurateConfig,
    *,
    db: SnapshotDB | None = None,
    clip: ClipConfig | None = None,
) -> ShardStats:
    """Write one subset (see :func:`curate_subsets`); ``clip`` gives the CLIP thresholds."""
    if db is None:
        with open_snapshot(root, snapshot, config, clip) as own:
            return curate_subsets(own, {name: subset}, config)[name]
    return curate_subsets(db, {name: subset}, config)[name]


def curate_snapshot(
    root: str, snapshot: str, config: CurateConfig, names: list[str] | None = None, *, clip: ClipConfig | None = None
) -> dict[str, ShardStats]:
    """Every (or the named) configured subset: one metadata copy, one scan."""
    chosen = names or list(config.subsets)
    unknown = [n for n in chosen if n not in config.subsets]
    if unknown:
        raise StageError(f"unknown subset(s) {unknown}; configured: {sorted(config.subsets)}")
    with open_snapshot(root, snapshot, config, clip) as db:
        return curate_subsets(db, {n: config.subsets[n] for n in chosen}, config)


def read_manifest(root: str, snapshot: str, name: str) -> dict[str, Any] | None:
    """A subset's manifest, or None when it was never (or not completely) written."""
    uri = storage.join(layout.subset_dir(root, snapshot, name), MANIFEST)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


# -- the stage's declaration ---------------------------------------------------------


def _run_curate(ctx: Context, name: str) -> ShardStats:
    """One scan per batch: the first subset that runs writes every configured subset (those
    that were current are rewritten identically), the others take their stats from it."""
    config = ctx.settings.curate
    if name not in config.subsets:
        raise StageError(f"unknown subset {name!r}; configured: {sorted(config.subsets)}")
    written: dict[str, ShardStats] = ctx.resource("curated_subsets", dict)
    if name not in written:
        db = ctx.resource("snapshot_db", lambda: open_snapshot(ctx.root, ctx.snapshot, config, ctx.settings.clip))
        written.update(curate_subsets(db, {n: s for n, s in config.subsets.items() if n not in written}, config))
    return written[name]


SPEC = StageSpec(
    name="curate",
    mapped=False,  # one task curates every subset from one scan
    publishes=lambda settings: list(settings.curate.subsets),
    reads=("download", "clip", "tag", "dedup"),
    # one shard per subset: its own predicate, the shared rules, and the CLIP thresholds applied here
    result_fields=(
        "curate.subsets.{shard}",
        "curate.require_clip_kept",
        "curate.rows_per_file",
        "curate.samples_per_tar",
        "clip.*.threshold",
        # the image rule embeds an ImageFolder target set with the English model (subset_rules)
        "clip.english.model", "clip.english.pretrained", "clip.english.checkpoint", "clip.device", "clip.seed",
    ),
    output=lambda ctx, name: storage.join(layout.subset_dir(ctx.root, ctx.snapshot, name), MANIFEST),
    run_shard=_run_curate,
    shards=lambda ctx: list(ctx.settings.curate.subsets),
    plan_name="subsets",
    section="curate",
    after_batch=lambda ctx, shards: {"subsets": {n: r.get("extra", {}) for n, r in shards.items()}},
)
