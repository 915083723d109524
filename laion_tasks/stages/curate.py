"""Curate: evaluate each configured subset's predicate over a snapshot, out of core.

Who enters a subset (checked in this order; the first failing check is the sample's
drop reason, so every download row lands in exactly one outcome):

1. ``drop:not_downloaded``   download ``status`` is not ``'success'``;
2. ``drop:not_clip_scored``  no CLIP similarity (no clip row, or no_image / decode_error / empty_caption);
3. ``drop:clip_filtered``    CLIP stage did not keep it (``clip_status != 'kept'``), when
                             ``curate.require_clip_kept`` (default: LAION subsets are subsets of LAION-5B);
4. ``drop:hashlist_blocked`` the tag stage matched a URL / image hash list;
5. ``drop:duplicate``        dedup names another sample as its representative (``dup_of`` set);
6. ``kept`` if the subset predicate is true, else ``drop:predicate`` (NULL counts as false).

A subset whose predicate reads a column that is NULL for every eligible sample
(``aesthetic_score`` without aesthetic weights) is ``unavailable``: the eligible rows
count as ``drop:unavailable``, the manifest says why, and no data files are written.

Output under ``subsets/<name>/``: ``part-NNNNN.parquet`` in LAION's column layout (see
:data:`LAION_COLUMNS_SQL`), ordered by (shard, key), ``rows_per_file`` rows each;
optionally ``webdataset/NNNNN.tar`` + ``sizes.json`` for open_clip; and last
``manifest.json``, the commit point (deleted first, so a crash leaves none).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import layout, storage
from laion_tasks.config import CurateConfig, SubsetConfig
from laion_tasks.snapshot_db import SAMPLES_VIEW, SnapshotDB, open_snapshot, predicate_columns
from laion_tasks.stage import Context, ShardStats, StageError, StageSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WDS_DIR = "webdataset"
PART_RE = re.compile(r"^part-\d{5,}\.parquet$")
TAR_RE = re.compile(r"^\d{5,}\.tar$")

# (outcome, SQL condition that makes a sample fail this check), in pipeline order.
_BASE_CHECKS: list[tuple[str, str]] = [
    ("drop:not_downloaded", "status IS DISTINCT FROM 'success'"),
    ("drop:not_clip_scored", "similarity IS NULL"),
    ("drop:clip_filtered", "clip_status IS DISTINCT FROM 'kept'"),
    ("drop:hashlist_blocked", "coalesce(hashlist_blocked, false)"),
    ("drop:duplicate", "dup_of IS NOT NULL"),
]
ELIGIBLE = "eligible"
BASE_OUTCOMES = [name for name, _ in _BASE_CHECKS] + [ELIGIBLE]

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


def base_checks(config: CurateConfig) -> list[tuple[str, str]]:
    return [(o, cond) for o, cond in _BASE_CHECKS if o != "drop:clip_filtered" or config.require_clip_kept]


def base_outcome_sql(config: CurateConfig) -> str:
    """CASE expression giving each sample its first failing base check, else 'eligible'."""
    whens = "\n".join(f"    WHEN {cond} THEN '{outcome}'" for outcome, cond in base_checks(config))
    return f"CASE\n{whens}\n    ELSE '{ELIGIBLE}'\n  END"


def eligible_sql(config: CurateConfig) -> str:
    """Boolean SQL: the sample passes every base check."""
    return " AND ".join(f"NOT coalesce({cond}, false)" for _, cond in base_checks(config))


@dataclass
class SubsetCounts:
    """Counts of a snapshot against the configured subsets, from one scan."""

    base: dict[str, int]
    """Samples per base outcome (``drop:...`` and ``eligible``); sums to the download rows."""
    matched: dict[str, int]
    """Eligible samples matching each subset's predicate."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Subset name -> why it cannot be computed."""

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
            out["kept"] = self.matched.get(name, 0)
            out["drop:predicate"] = self.eligible - out["kept"]
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


def count_subsets(db: SnapshotDB, subsets: dict[str, SubsetConfig], config: CurateConfig) -> SubsetCounts:
    """One scan: base outcomes, per-subset matches and the non-NULL count of every predicate column."""
    columns_by_subset = {name: _validated_columns(db, name, s) for name, s in subsets.items()}
    columns = sorted(set().union(*columns_by_subset.values())) if subsets else []
    matches = [f"count_if(coalesce(({s.where}), false)) AS m{i}" for i, s in enumerate(subsets.values())]
    nonnull = [f"count({c}) AS n{i}" for i, c in enumerate(columns)]
    select = ", ".join(["count(*) AS n"] + matches + nonnull)
    rows = db.con.execute(
        f"SELECT base_outcome, {select} FROM "
        f"(SELECT {base_outcome_sql(config)} AS base_outcome, * FROM {SAMPLES_VIEW}) GROUP BY base_outcome"
    ).fetchall()
    base = {o: 0 for o in BASE_OUTCOMES if o != "drop:clip_filtered" or config.require_clip_kept}
    matched = {name: 0 for name in subsets}
    nonnull_eligible = {c: 0 for c in columns}
    for row in rows:
        outcome, n = row[0], int(row[1])
        base[outcome] = n
        if outcome != ELIGIBLE:
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


def subset_counts(
    root: str, snapshot: str, config: CurateConfig, *, db: SnapshotDB | None = None
) -> SubsetCounts:
    """Counts for every configured subset without writing anything (for the card and `laion curate --dry-run`)."""
    if db is not None:
        return count_subsets(db, config.subsets, config)
    with open_snapshot(root, snapshot, config) as own:
        return count_subsets(own, config.subsets, config)


# -- writing -------------------------------------------------------------------


def _subset_rows_sql(subset: SubsetConfig, config: CurateConfig, select: str) -> str:
    return (
        f"SELECT {select} FROM (SELECT *, ('0x' || substr(sha256(coalesce(url, '') || coalesce(caption, '')), 1, 16))"
        f"::UBIGINT AS h64 FROM {SAMPLES_VIEW}) "
        f"WHERE {eligible_sql(config)} AND coalesce(({subset.where}), false) ORDER BY shard, key"
    )


def _write_parquet_parts(db: SnapshotDB, out_dir: str, subset: SubsetConfig, config: CurateConfig) -> list[dict[str, Any]]:
    """Stream the subset's rows into ``part-NNNNN.parquet`` files of ``rows_per_file`` rows."""
    reader = db.con.sql(_subset_rows_sql(subset, config, LAION_COLUMNS_SQL)).to_arrow_reader(
        min(config.rows_per_file, 65_536)
    )
    parts: list[dict[str, Any]] = []
    batches = iter(reader)
    pending: pa.RecordBatch | None = None
    while True:
        index = len(parts)
        uri = storage.join(out_dir, f"part-{index:05d}.parquet")
        rows = 0
        with storage.atomic_local_path(uri, suffix=".parquet") as tmp:
            with pq.ParquetWriter(tmp, reader.schema, compression="zstd") as writer:
                while rows < config.rows_per_file:
                    if pending is None:
                        pending = next(batches, None)
                        if pending is None:
                            break
                    room = config.rows_per_file - rows
                    chunk, pending = (pending, None) if pending.num_rows <= room else (
                        pending.slice(0, room), pending.slice(room)
                    )
                    if chunk.num_rows:
                        writer.write_batch(chunk)
                        rows += chunk.num_rows
            size = tmp.stat().st_size
        parts.append({"name": uri.replace("\\", "/").rsplit("/", 1)[-1], "rows": rows, "bytes": size})
        if pending is None:
            # Peek: stop unless more rows follow (an empty subset still gets one empty part with the schema).
            pending = next(batches, None)
            if pending is None:
                break
    return parts


def _split_member(name: str) -> tuple[str | None, str | None]:
    """WebDataset's key/extension split: ``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``)."""
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


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


def iter_tar_samples(handle: IO[bytes], wanted: set[str]) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]:
    """Stream a WebDataset tar, yielding (key, members) for the wanted keys, in tar order."""
    current: str | None = None
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    with tarfile.open(fileobj=handle, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _ext = _split_member(info.name)
            if key is None or Path(key).name not in wanted:
                continue
            if current is not None and key != current:
                yield Path(current).name, members
                members = []
            current = key
            extracted = tar.extractfile(info)
            members.append((info, extracted.read() if extracted else b""))
    if current is not None:
        yield Path(current).name, members


def _iter_subset_keys_by_shard(db: SnapshotDB, subset: SubsetConfig, config: CurateConfig) -> Iterator[tuple[str, set[str]]]:
    reader = db.con.sql(_subset_rows_sql(subset, config, "shard, key")).to_arrow_reader(65_536)
    shard: str | None = None
    keys: set[str] = set()
    for batch in reader:
        for s, k in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if s != shard:
                if shard is not None:
                    yield shard, keys
                shard, keys = s, set()
            keys.add(k)
    if shard is not None:
        yield shard, keys


def _write_webdataset(db: SnapshotDB, out_dir: str, subset: SubsetConfig, config: CurateConfig) -> dict[str, Any]:
    """Copy the subset's samples (all their files: jpg, txt, json) out of the download tars."""
    wds_dir = storage.join(out_dir, WDS_DIR)
    writer = _RollingTarWriter(wds_dir, config.samples_per_tar)
    missing = 0
    try:
        for shard, keys in _iter_subset_keys_by_shard(db, subset, config):
            tar_uri = layout.images_tar_uri(db.root, db.snapshot, shard)
            found: set[str] = set()
            try:
                with storage.open_read(tar_uri) as handle:
                    for key, members in iter_tar_samples(handle, keys):
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


def curate_subset(
    root: str,
    snapshot: str,
    name: str,
    subset: SubsetConfig,
    config: CurateConfig,
    *,
    db: SnapshotDB | None = None,
) -> ShardStats:
    """Write one subset; return its per-sample outcomes (summing to the snapshot's download rows).

    ``db`` lets several subsets share one :class:`SnapshotDB` (and one S3 staging).
    ``stats.extra`` holds ``status`` (``ok`` | ``unavailable``), ``reason``, ``rows`` and the files.
    """
    if db is None:
        with open_snapshot(root, snapshot, config) as own:
            return curate_subset(root, snapshot, name, subset, config, db=own)
    out_dir = layout.subset_dir(root, snapshot, name)
    manifest_uri = storage.join(out_dir, MANIFEST)
    if storage.exists(manifest_uri):
        storage.delete(manifest_uri)  # until the new manifest lands, the subset reads as not done

    counts = count_subsets(db, {name: subset}, config)
    outcomes = counts.outcomes(name)
    stats = ShardStats(counts=Counter(outcomes))
    manifest: dict[str, Any] = {
        "subset": name,
        "snapshot": snapshot,
        "where": subset.where,
        "description": subset.description,
        "require_clip_kept": config.require_clip_kept,
        "counts": dict(sorted(outcomes.items())),
        "total_samples": counts.total,
    }
    keep: set[str] = set()
    if name in counts.unavailable:
        manifest.update(status="unavailable", reason=counts.unavailable[name], rows=0, parquet=[])
        log.warning("subset %s unavailable: %s", name, counts.unavailable[name])
    else:
        parts = _write_parquet_parts(db, out_dir, subset, config)
        rows = sum(p["rows"] for p in parts)
        if rows != outcomes.get("kept", 0):
            raise StageError(f"subset {name}: wrote {rows} rows but counted {outcomes.get('kept', 0)} kept samples")
        keep |= {p["name"] for p in parts}
        stats.bytes_written += sum(p["bytes"] for p in parts)
        manifest.update(
            status="ok",
            reason=None,
            rows=rows,
            columns=LAION_COLUMNS,
            hash=HASH_DEFINITION,
            parquet=[{"name": p["name"], "rows": p["rows"]} for p in parts],
        )
        if subset.write_images:
            wds = _write_webdataset(db, out_dir, subset, config)
            keep |= {f"{WDS_DIR}/{s['name']}" for s in wds["shards"]} | {f"{WDS_DIR}/sizes.json"}
            stats.bytes_written += wds.pop("bytes")
            manifest["webdataset"] = wds
    _remove_stale(out_dir, keep)
    blob = json.dumps(manifest, indent=2, sort_keys=True).encode()
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
    return stats


def curate_snapshot(
    root: str, snapshot: str, config: CurateConfig, names: list[str] | None = None
) -> dict[str, ShardStats]:
    """Every (or the named) configured subset over one shared :class:`SnapshotDB`."""
    chosen = names or list(config.subsets)
    unknown = [n for n in chosen if n not in config.subsets]
    if unknown:
        raise StageError(f"unknown subset(s) {unknown}; configured: {sorted(config.subsets)}")
    with open_snapshot(root, snapshot, config) as db:
        return {n: curate_subset(root, snapshot, n, config.subsets[n], config, db=db) for n in chosen}


def read_manifest(root: str, snapshot: str, name: str) -> dict[str, Any] | None:
    """A subset's manifest, or None when it was never (or not completely) written."""
    uri = storage.join(layout.subset_dir(root, snapshot, name), MANIFEST)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


# -- the stage's declaration ---------------------------------------------------------


def _run_curate(ctx: Context, name: str) -> ShardStats:
    config = ctx.settings.curate
    if name not in config.subsets:
        raise StageError(f"unknown subset {name!r}; configured: {sorted(config.subsets)}")
    db = ctx.resource("snapshot_db", lambda: open_snapshot(ctx.root, ctx.snapshot, config))  # shared by a batch's subsets
    return curate_subset(ctx.root, ctx.snapshot, name, config.subsets[name], config, db=db)


SPEC = StageSpec(
    name="curate",
    reads=("download", "clip", "tag", "dedup"),
    # one shard per subset: its own predicate, the shared rules, and the CLIP thresholds applied here
    result_fields=(
        "curate.subsets.{shard}",
        "curate.require_clip_kept",
        "curate.rows_per_file",
        "curate.samples_per_tar",
        "clip.*.threshold",
    ),
    output=lambda ctx, name: storage.join(layout.subset_dir(ctx.root, ctx.snapshot, name), MANIFEST),
    run_shard=_run_curate,
    shards=lambda ctx: list(ctx.settings.curate.subsets),
    plan_name="subsets",
    section="curate",
    after_batch=lambda ctx, shards: {"subsets": {n: r.get("extra", {}) for n, r in shards.items()}},
)
