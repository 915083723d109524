"""Dedup step 2: rank, digest and cluster one run of shards (module doc of :mod:`laion_tasks.stages.dedup`)."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import storage
from laion_tasks.config import ClipConfig, CurateConfig, DedupConfig
from laion_tasks.stage import ShardStats, StageError
from laion_tasks.stages.dedup.common import (
    CHUNK_ROWS,
    INELIGIBLE_BIT,
    RUN_SHIFT,
    ShardInput,
    _duckdb,
    _embedding_rows,
    _has_embedding,
    _normalise,
    run_prefix,
)
from laion_tasks.stages.dedup.centroids import Centroids

log = logging.getLogger(__name__)


def _shard_rows_sql(
    images: set[str], clip: set[str] | None, tags: set[str] | None, clip_config: ClipConfig, curate: CurateConfig
) -> str:
    """One shard's rows in key order, with eligibility (curate's own definition) and the two exact-dedup digests."""
    from laion_tasks.snapshot_db import clip_kept_sql, eligible_sql

    def col(present: set[str] | None, table: str, name: str, typ: str) -> str:
        return f"CAST({table}.{name} AS {typ})" if present and name in present else f"NULL::{typ}"

    url, caption = col(images, "i", "url", "VARCHAR"), col(images, "i", "caption", "VARCHAR")
    sha = col(images, "i", "sha256", "VARCHAR")
    status = col(images, "i", "status", "VARCHAR")
    kept = clip_kept_sql(clip_config, col(clip, "c", "similarity", "DOUBLE"), col(clip, "c", "language_group", "VARCHAR"))
    blocked = (f"coalesce({col(tags, 't', 'hashlist_blocked', 'BOOLEAN')}, false) "
               f"OR coalesce({col(tags, 't', 'tag_status', 'VARCHAR')} = 'blocked_hashlist', false)")
    joins = ("LEFT JOIN c ON c.key = i.key " if clip is not None else "") + (
        "LEFT JOIN t ON t.key = i.key " if tags is not None else "")
    return f"""
        SELECT key, uid, pos, coalesce({eligible_sql(curate)}, false) AS eligible, ua1, ua2, sh1, sh2, clip_pos
        FROM (
          SELECT i.key, {col(images, 'i', 'uid', 'VARCHAR')} AS uid, i.pos,
                 {status} AS status, {col(clip, 'c', 'similarity', 'DOUBLE')} AS similarity, {kept} AS clip_kept,
                 {blocked} AS hashlist_blocked,
                 CASE WHEN {url} IS NOT NULL THEN md5_number_upper({url} || chr(0) || coalesce({caption}, '')) END AS ua1,
                 CASE WHEN {url} IS NOT NULL THEN md5_number_lower({url} || chr(0) || coalesce({caption}, '')) END AS ua2,
                 TRY_CAST('0x' || substr({sha}, 1, 16) AS UBIGINT) AS sh1,
                 TRY_CAST('0x' || substr({sha}, 17, 16) AS UBIGINT) AS sh2,
                 {'c.pos' if clip is not None else 'NULL::BIGINT'} AS clip_pos
          FROM i {joins})
        ORDER BY key
    """


def _read_with_pos(uri: str, what: str) -> pa.Table:
    from laion_tasks.stage import read_parquet

    table = read_parquet(uri, what)
    return table.append_column("pos", pa.array(np.arange(table.num_rows, dtype=np.int64)))


@dataclass
class _ShardVectors:
    shard: ShardInput
    emb_rows: np.ndarray
    """Row of each vector in the shard's .npy."""
    rank: np.ndarray
    probes: np.ndarray


def _iter_vectors(emb_uri: str, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(start, normalised fp32 chunk) of the given rows of a memory-mapped .npy, in order."""
    with storage.local_copy(emb_uri) as path:
        emb = np.load(path, mmap_mode="r")
        for start in range(0, len(rows), CHUNK_ROWS):
            yield start, _normalise(emb[rows[start : start + CHUNK_ROWS]])


def dedup_partition(
    inputs: list[ShardInput],
    run: int,
    work_dir: str,
    config: DedupConfig,
    clip: ClipConfig,
    centroids: str | None = None,
    curate: CurateConfig | None = None,
) -> ShardStats:
    """Rank, digest and cluster one run of shards (see module doc, step 2).

    ``curate`` defines eligibility (the rank's ineligible bit), as curate does (default: CurateConfig())."""
    curate = curate or CurateConfig()
    prefix = run_prefix(work_dir, run, [s.shard for s in inputs])
    stats = ShardStats(output_uri=f"{prefix}.rows.parquet")
    tree = Centroids.load(centroids) if centroids and config.near_dup else None
    vectors: list[_ShardVectors] = []
    base = np.int64(run) << np.int64(RUN_SHIFT)
    position = 0
    bad_sha = 0
    with tempfile.TemporaryDirectory(prefix="laion-dedup-") as tmp:
        con = _duckdb(config.memory_limit, Path(tmp) / "spill")
        with storage.atomic_local_path(f"{prefix}.rows.parquet", suffix=".parquet") as rows_tmp:
            writer: pq.ParquetWriter | None = None
            for shard in sorted(inputs, key=lambda s: s.shard):
                images = _read_with_pos(shard.images, "download parquet")
                con.register("i", images)
                clip_cols = tags_cols = None
                if shard.clip:
                    clip_table = _read_with_pos(shard.clip, "clip parquet")
                    clip_cols = set(clip_table.column_names)
                    con.register("c", clip_table)
                if shard.tags and storage.exists(shard.tags):
                    tags_table = _read_with_pos(shard.tags, "tags parquet")
                    tags_cols = set(tags_table.column_names)
                    con.register("t", tags_table)
                table = con.sql(_shard_rows_sql(set(images.column_names), clip_cols, tags_cols, clip, curate)).to_arrow_table()
                n = table.num_rows
                eligible = table.column("eligible").to_numpy(zero_copy_only=False).astype(bool)
                rank = (base + position + np.arange(n, dtype=np.int64)) | (
                    (~eligible).astype(np.int64) << np.int64(INELIGIBLE_BIT))
                position += n
                has_sha = pa.compute.is_valid(table.column("sh1"))
                bad_sha += int(pa.compute.sum(pa.compute.is_valid(images.column("sha256"))).as_py() or 0) - int(
                    pa.compute.sum(has_sha).as_py() or 0) if "sha256" in images.column_names else 0
                out = pa.table({
                    "shard": pa.array([shard.shard] * n, pa.string()) if n else pa.array([], pa.string()),
                    "key": table.column("key").cast(pa.string()),
                    "uid": table.column("uid"),
                    "pos": table.column("pos").cast(pa.int64()),
                    "rank": pa.array(rank, pa.int64()),
                    "ua1": table.column("ua1"), "ua2": table.column("ua2"),
                    "sh1": table.column("sh1"), "sh2": table.column("sh2"),
                })
                if writer is None:
                    writer = pq.ParquetWriter(rows_tmp, out.schema, compression="zstd")
                writer.write_table(out)
                stats.add("success", n)
                for name in ("i", "c", "t"):
                    with contextlib.suppress(Exception):
                        con.unregister(name)
                if tree is None or not shard.clip or not shard.embeddings:
                    continue
                clip_pos = table.column("clip_pos").to_numpy(zero_copy_only=False)
                clip_pos = np.where(np.isnan(clip_pos.astype(float)), -1, clip_pos).astype(np.int64)
                has = _has_embedding(shard.clip)
                with storage.local_copy(shard.embeddings) as path:
                    emb_len = int(np.load(path, mmap_mode="r").shape[0])
                row_of = _embedding_rows(has, emb_len, shard.embeddings)
                emb_rows = np.where(clip_pos >= 0, row_of[np.maximum(clip_pos, 0)], -1)
                with_vec = np.flatnonzero(emb_rows >= 0)
                probes = np.empty((len(with_vec), max(1, config.near_dup_probes)), dtype=np.int32)
                for start, chunk in _iter_vectors(shard.embeddings, emb_rows[with_vec]):
                    probes[start : start + len(chunk)] = tree.assign(chunk, config.near_dup_probes)[:, : probes.shape[1]]
                vectors.append(_ShardVectors(shard, emb_rows[with_vec], rank[with_vec], probes))
            if writer is None:
                raise StageError(f"dedup_partition: run {run} has no shards")
            writer.close()
            stats.bytes_written += rows_tmp.stat().st_size
            if tree is not None:
                stats.bytes_written += _write_run_vectors(prefix, vectors, config, tree.rotation)
        con.close()
    stats.extra.update({"run": run, "shards": len(inputs), "vectors": int(sum(len(v.rank) for v in vectors)),
                        "sha256_not_hex": bad_sha})
    return stats.done()


def _write_run_vectors(prefix: str, vectors: list[_ShardVectors], config: DedupConfig, rotation: np.ndarray) -> int:
    """Write the run's vectors, rotated, sorted by nearest cluster (.vec.npy fp16, .primary.npy, .rank.npy),
    and .visit.npy: (cluster, row) for every other probe of a row, sorted by cluster."""
    probes = np.concatenate([v.probes for v in vectors]) if vectors else np.zeros((0, config.near_dup_probes), np.int32)
    rank = np.concatenate([v.rank for v in vectors]) if vectors else np.zeros(0, np.int64)
    order = np.argsort(probes[:, 0], kind="stable")
    dest = np.empty_like(order)
    dest[order] = np.arange(len(order))
    dim = 0
    for v in vectors:
        with storage.local_copy(v.shard.embeddings) as path:  # type: ignore[arg-type]
            dim = int(np.load(path, mmap_mode="r").shape[1])
        break
    written = 0
    with storage.atomic_local_path(f"{prefix}.vec.npy", suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(order), dim))
        start_row = 0
        for v in vectors:
            for start, chunk in _iter_vectors(v.shard.embeddings, v.emb_rows):  # type: ignore[arg-type]
                where = dest[start_row + start : start_row + start + len(chunk)]
                sort = np.argsort(where)
                out[where[sort]] = (chunk[sort] @ rotation).astype(np.float16)
            start_row += len(v.rank)
        out.flush()
        del out
        written += tmp.stat().st_size
    sorted_probes = probes[order]
    written += storage.write_npy(f"{prefix}.primary.npy", np.ascontiguousarray(sorted_probes[:, 0]))
    rows = np.repeat(np.arange(len(order), dtype=np.int64), sorted_probes.shape[1] - 1)
    clusters = sorted_probes[:, 1:].astype(np.int64).ravel()
    keep = clusters != np.repeat(sorted_probes[:, 0], sorted_probes.shape[1] - 1)  # a repeated nearest adds nothing
    visit = np.stack([clusters[keep], rows[keep]], axis=1)
    written += storage.write_npy(f"{prefix}.visit.npy", visit[np.argsort(visit[:, 0], kind="stable")])
    written += storage.write_npy(f"{prefix}.rank.npy", rank[order])
    return written
