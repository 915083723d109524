"""Snapshot-wide deduplication: exact (url, alt), exact image sha256, near-duplicate embeddings.

Built so that the cost per row stays flat and memory stays within ``dedup.memory_limit``
as a snapshot grows to hundreds of millions of rows:

1. ``dedup_centroids`` (one task, only for near-dups): SemDeDup-style spherical k-means
   with ``K = embeddings / cluster_size`` clusters, trained on a sample, as a two-level tree
   (``sqrt(2 probes K)`` top cells, each split into its share of the leaves). Assigning a
   vector then costs ``~2 sqrt(2 probes K)`` dot products instead of ``K``.
2. ``dedup_partition`` (one task per *run*, a contiguous batch of shards): one DuckDB query
   per shard gives every row its rank (eligible rows first, then shard and key order) and
   the digests of its (url, alt) and image sha256, with no Python per row. Embeddings are
   read memory-mapped, in chunks, and assigned to their ``near_dup_probes`` nearest
   clusters. The run writes ``runs/<run>.rows.parquet`` plus its vectors sorted by nearest
   cluster (``.vec.npy`` fp16, ``.primary.npy``, ``.rank.npy``) and the (cluster, row) pairs
   of their other probes sorted by cluster (``.visit.npy``): five objects per run, and a bucket
   finds its slice of each by binary search, without reading the rest.
3. ``dedup_near`` (one task per bucket, a contiguous range of clusters): for each cluster,
   FAISS searches its members' normalised vectors with every vector that has the cluster
   among its probes (range search on the CPU, exact kNN on the GPU), for pairs at cosine
   >= ``near_dup_threshold``. A greedy pass in rank order keeps a row unless an earlier
   *kept* row is within the threshold, so no A~B~C chain removes C for B.
   Writes ``decisions/<bucket>.parquet`` (rank, dup rank).
4. ``dedup_resolve`` (one task, DuckDB within ``memory_limit``, spills to disk): exact
   groups by hash aggregation (representative = smallest rank), plus the near-dup
   decisions; per row the first criterion (url_alt > sha256 > near_embedding) wins, and
   pointers are followed to the final representative. Writes ``<out>/<shard>.parquet``:
   one row per input row with ``uid, key, shard, dup_of, dup_of_key, dup_of_shard,
   dup_reason`` (null for representatives).

Objects: O(shards + runs + buckets), never shards x buckets.

The representative rule: a row is *eligible* when it was downloaded, reaches the CLIP
threshold of its model (``clip.*.threshold``) and is not hash-list blocked, as curate
decides. Ranks put every eligible row before every ineligible one, and every pointer goes
to a smaller rank, so a linked group keeps its smallest-rank row, which is eligible if any
member is: a duplicate group is never lost whole.

Trade-off: a near-dup pair in which neither vector's nearest cluster is among the other's
``near_dup_probes`` nearest is missed (bench/dedup_bench.py measures the recall).

``uid`` is sha256(url NUL alt) from the extract stage, so exact (url, alt) duplicates
share a uid: join these verdicts on (shard, key), not on uid.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import layout, storage
from laion_tasks.config import ClipConfig, CurateConfig, DedupConfig, memory_bytes
from laion_tasks.stage import Context, ShardStats, StageError, StageSpec

log = logging.getLogger(__name__)

REASONS = ("url_alt", "sha256", "near_embedding")
"""Criterion ids 0, 1, 2; also the precedence of ``dup_reason``."""

OUTPUT_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("shard", pa.string()),
        ("dup_of", pa.string()),
        ("dup_of_key", pa.string()),
        ("dup_of_shard", pa.string()),
        ("dup_reason", pa.string()),
        # what curate needs to dedup within each subset (resolve_verdicts on the subset's rows)
        ("rank", pa.int64()),
        ("ua1", pa.uint64()),
        ("ua2", pa.uint64()),
        ("sh1", pa.uint64()),
        ("sh2", pa.uint64()),
    ]
)
DECISION_SCHEMA = pa.schema([("rank", pa.int64()), ("dup", pa.int64())])

INELIGIBLE_BIT = 62
RUN_SHIFT = 40
"""rank = ineligible << 62 | run << 40 | position in the run's (shard, key) order."""
CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class ShardInput:
    """One download shard's inputs to dedup (clip, embeddings and tags are optional)."""

    shard: str
    images: str
    clip: str | None = None
    embeddings: str | None = None
    tags: str | None = None


def run_name(run: int, shards: list[str]) -> str:
    """``run-<index>-<digest of its shard ids>``: a run's files are named by what it holds, so a
    re-plan that moves a shard into another run (a grown crawl, a new ``max_mapped_tasks``) names
    a new run, which is computed, instead of finding an old file without the shard's rows."""
    import hashlib

    digest = hashlib.sha256("\n".join(sorted(shards)).encode()).hexdigest()[:12]
    return f"run-{run:05d}-{digest}"


def run_prefix(work_dir: str, run: int, shards: list[str]) -> str:
    return storage.join(work_dir, "runs", run_name(run, shards))


RUN_FILES = (".rows.parquet", ".vec.npy", ".primary.npy", ".visit.npy", ".rank.npy")


def remove_stale_runs(work_dir: str, current: list[str]) -> int:
    """Delete the files of runs that are not in the current plan (a superseded grouping); returns how many."""
    keep = set(current)
    removed = 0
    for uri in storage.list_uris(storage.join(work_dir, "runs")):
        prefix = next((uri[: -len(s)] for s in RUN_FILES if uri.endswith(s)), None)
        if prefix is not None and prefix not in keep:
            storage.delete(uri)
            removed += 1
    return removed


def decision_uri(work_dir: str, bucket: int) -> str:
    return storage.join(work_dir, "decisions", f"{bucket:05d}.parquet")


def pairs_uri(work_dir: str) -> str:
    """Every near-duplicate pair (rank, dup) of the snapshot: curate resolves each subset's rows with them."""
    return storage.join(work_dir, "pairs.parquet")


def centroids_uri(work_dir: str) -> str:
    return storage.join(work_dir, "centroids.npz")


def list_runs(work_dir: str) -> list[str]:
    """Prefixes of the committed runs (their rows parquet is written last)."""
    return [u[: -len(".rows.parquet")] for u in storage.list_uris(storage.join(work_dir, "runs"), ".rows.parquet")]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def _duckdb(memory_limit: str, spill: Path):  # type: ignore[no-untyped-def]
    from laion_tasks import duck

    return duck.connect(memory_limit, spill, ordered=False)


# ---------------------------------------------------------------- embeddings of a shard


def _has_embedding(clip_uri: str) -> np.ndarray:
    from laion_tasks.stage import read_parquet

    names = pq.read_schema(str(storage.local_path(clip_uri))).names if not storage.is_s3(clip_uri) else None
    if names is not None and "has_embedding" not in names:
        n = pq.read_metadata(str(storage.local_path(clip_uri))).num_rows
        return np.ones(n, dtype=bool)
    table = read_parquet(clip_uri, "clip parquet", ["has_embedding"])
    return np.asarray(table.column(0).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _embedding_rows(has: np.ndarray, emb_rows: int, where: str) -> np.ndarray:
    """Row of each clip row's vector in the .npy (-1 without one): the array holds all rows or only those with one."""
    if emb_rows == len(has):
        return np.where(has, np.arange(len(has)), -1)
    if emb_rows == int(has.sum()):
        return np.where(has, np.cumsum(has) - 1, -1)
    raise StageError(f"{where}: {emb_rows} embedding rows do not match {len(has)} clip rows")


# ---------------------------------------------------------------- 1. centroids


@dataclass
class Centroids:
    """Two-level k-means tree: ``top`` cells, each owning ``leaves[offsets[j]:offsets[j+1]]``.

    Clustering sees vectors with the sample ``mean`` removed (then re-normalised): CLIP-like
    embeddings share one strong direction, and without centering a few "hub" clusters near it
    collect many times ``cluster_size`` members (measured: 3x the search cost per row at 4M rows).
    Near-duplicates stay near after the shift. ``rotation`` (PCA of the sample, orthonormal, so
    cosines are unchanged) is applied to the vectors a run stores: their leading dimensions then carry most of the energy, which lets
    the near-dup search reject most pairs from a quarter of the dimensions (see :func:`similar_pairs`).
    """

    top: np.ndarray
    leaves: np.ndarray
    offsets: np.ndarray
    rotation: np.ndarray
    mean: np.ndarray

    @property
    def n_leaves(self) -> int:
        return int(self.leaves.shape[0])

    def save(self, uri: str) -> int:
        with storage.atomic_local_path(uri, suffix=".npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, top=self.top, leaves=self.leaves, offsets=self.offsets, rotation=self.rotation,
                         mean=self.mean)
            return tmp.stat().st_size

    @classmethod
    def load(cls, uri: str) -> "Centroids":
        with storage.local_copy(uri) as path, np.load(path) as z:
            return cls(z["top"].astype(np.float32), z["leaves"].astype(np.float32), z["offsets"].astype(np.int64),
                       z["rotation"].astype(np.float32), z["mean"].astype(np.float32))

    def assign(self, x: np.ndarray, probes: int, top_probes: int | None = None) -> np.ndarray:
        """(n, probes) leaf ids, nearest first, for normalised fp32 vectors.

        The ``top_probes`` (default ``2 * probes``) nearest top cells are searched for their
        ``probes`` nearest leaves each; the best ``probes`` of those are kept.
        """
        import faiss

        x = _normalise(x - self.mean)
        n = x.shape[0]
        probes = max(1, min(probes, self.n_leaves))
        top_k = max(1, min(top_probes or 2 * probes, self.top.shape[0]))
        _, cells = faiss.knn(x, self.top, top_k, metric=faiss.METRIC_INNER_PRODUCT)
        cand_s = np.full((n, top_k * probes), -np.inf, dtype=np.float32)
        cand_l = np.full((n, top_k * probes), -1, dtype=np.int64)
        flat = cells.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(self.top.shape[0] + 1))
        for cell in np.flatnonzero(np.diff(bounds)):
            hits = order[bounds[cell] : bounds[cell + 1]]
            rows, rank = hits // top_k, hits % top_k
            lo, hi = int(self.offsets[cell]), int(self.offsets[cell + 1])
            k = min(probes, hi - lo)
            if k == 0:
                continue
            sim, ids = faiss.knn(x[rows], self.leaves[lo:hi], k, metric=faiss.METRIC_INNER_PRODUCT)
            cols = rank[:, None] * probes + np.arange(k)[None, :]
            cand_s[rows[:, None], cols] = sim
            cand_l[rows[:, None], cols] = ids + lo
        pick = np.argsort(-cand_s, axis=1, kind="stable")[:, :probes]
        best = np.take_along_axis(cand_l, pick, axis=1)
        # fewer distinct leaves than probes (tiny data): repeat the nearest, it adds no work
        missing = best < 0
        best[missing] = np.broadcast_to(best[:, :1], best.shape)[missing]
        return best.astype(np.int32)


def _kmeans(x: np.ndarray, k: int, config: DedupConfig) -> np.ndarray:
    import faiss

    k = max(1, min(k, x.shape[0]))
    if k == 1:
        return _normalise(x.mean(axis=0, keepdims=True))
    km = faiss.Kmeans(x.shape[1], k, niter=config.kmeans_iterations, seed=config.seed, spherical=True,
                      verbose=False, min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.astype(np.float32)


def train_centroids(sample: np.ndarray, n_leaves: int, config: DedupConfig) -> Centroids:
    """Two-level spherical k-means on a (normalised, fp16 or fp32) sample, centred first (see Centroids)."""
    import faiss

    rotation = _pca_rotation(sample)
    mean = np.zeros(sample.shape[1], dtype=np.float64)
    for start in range(0, sample.shape[0], CHUNK_ROWS):
        mean += _normalise(sample[start : start + CHUNK_ROWS]).sum(axis=0)
    mean = (mean / max(1, sample.shape[0])).astype(np.float32)
    sample = np.concatenate([_normalise(_normalise(sample[i : i + CHUNK_ROWS]) - mean).astype(np.float16)
                             for i in range(0, sample.shape[0], CHUNK_ROWS)])

    n_leaves = max(1, min(n_leaves, sample.shape[0]))
    # assigning costs n_top + top_probes * n_leaves / n_top dot products: least at sqrt(top_probes * n_leaves)
    n_top = max(1, min(int(round(math.sqrt(2 * config.near_dup_probes * n_leaves))), n_leaves, sample.shape[0]))
    rng = np.random.default_rng(config.seed)
    top_fit = sample[np.sort(rng.choice(sample.shape[0], min(sample.shape[0], n_top * 256), replace=False))]
    top = _kmeans(_normalise(top_fit), n_top, config)
    cell = np.empty(sample.shape[0], dtype=np.int64)
    for start in range(0, sample.shape[0], CHUNK_ROWS):
        part = _normalise(sample[start : start + CHUNK_ROWS])
        cell[start : start + len(part)] = faiss.knn(part, top, 1, metric=faiss.METRIC_INNER_PRODUCT)[1][:, 0]
    leaves, offsets = [], [0]
    for j in range(top.shape[0]):
        members = np.flatnonzero(cell == j)
        if members.size == 0:
            offsets.append(offsets[-1])
            continue
        share = max(1, int(round(n_leaves * members.size / sample.shape[0])))
        centres = _kmeans(_normalise(sample[members]), share, config)
        leaves.append(centres)
        offsets.append(offsets[-1] + centres.shape[0])
    return Centroids(top=top, leaves=np.concatenate(leaves), offsets=np.asarray(offsets, dtype=np.int64),
                     rotation=rotation, mean=mean)


def _pca_rotation(sample: np.ndarray) -> np.ndarray:
    """Orthonormal (d, d) matrix whose columns are the sample's principal axes, largest first."""
    d = sample.shape[1]
    cov = np.zeros((d, d), dtype=np.float64)
    for start in range(0, min(sample.shape[0], 16 * CHUNK_ROWS), CHUNK_ROWS):
        part = _normalise(sample[start : start + CHUNK_ROWS])
        cov += part.T.astype(np.float64) @ part.astype(np.float64)
    _, vecs = np.linalg.eigh(cov)
    return np.ascontiguousarray(vecs[:, ::-1], dtype=np.float32)


def dedup_centroids(inputs: list[ShardInput], out_uri: str, config: DedupConfig) -> ShardStats:
    """Train the near-dup clusters on a sample of every shard's embeddings; write them as .npz."""
    stats = ShardStats(output_uri=out_uri)
    shards = [s for s in inputs if s.clip and s.embeddings]
    counts = []
    for s in shards:
        counts.append(int(_has_embedding(s.clip).sum()))  # type: ignore[arg-type]
        stats.add("success")
    total = sum(counts)
    if not total:
        raise StageError("dedup_centroids: no shard has image embeddings")
    n_leaves = max(1, int(round(total / max(1, config.cluster_size))))
    with storage.local_copy(shards[0].embeddings) as path:  # type: ignore[arg-type]
        dim = int(np.load(path, mmap_mode="r").shape[1])
    # the sample is held as fp16; faiss trains on fp32 copies of one top cell at a time
    cap = max(n_leaves, memory_bytes(config.memory_limit) // (4 * 2 * dim))
    want = min(total, n_leaves * config.kmeans_sample_per_cluster, cap)
    rng = np.random.default_rng(config.seed)
    samples = []
    for s, count in zip(shards, counts):
        take = min(count, int(math.ceil(want * count / total)))
        if not take:
            continue
        has = _has_embedding(s.clip)  # type: ignore[arg-type]
        with storage.local_copy(s.embeddings) as path:  # type: ignore[arg-type]
            emb = np.load(path, mmap_mode="r")
            rows = _embedding_rows(has, emb.shape[0], s.embeddings or "")
            rows = rows[rows >= 0]
            samples.append(np.asarray(emb[np.sort(rng.choice(rows, take, replace=False))], dtype=np.float16))
    sample = np.concatenate(samples)
    centroids = train_centroids(sample, n_leaves, config)
    stats.bytes_written = centroids.save(out_uri)
    stats.extra.update({"embeddings": total, "sample_rows": int(sample.shape[0]), "clusters": centroids.n_leaves,
                        "top_cells": int(centroids.top.shape[0])})
    return stats.done()


# ---------------------------------------------------------------- 2. partition


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


# ---------------------------------------------------------------- 3. near-dups per cluster range


def _pairs_cpu(queries: np.ndarray, base: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    lims, _dist, ids = index.range_search(queries, float(threshold) - 1e-6)
    q = np.repeat(np.arange(len(queries)), np.diff(lims).astype(np.int64))
    return q, ids.astype(np.int64)


def similar_pairs(queries: np.ndarray, base: np.ndarray, threshold: float, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(query, base) index pairs with cosine >= threshold, for rotated unit vectors.

    Exact, but cheaper than a full search. By Cauchy-Schwarz the cosine is at most the dot
    product over the leading quarter of the dimensions plus the product of the two tails'
    norms. A first filter uses the largest tail norm of the base (one comparison per pair),
    the second the pair's own tail norms (on the survivors only); only pairs that pass both
    (about one in a thousand after the PCA rotation) get a full dot product.
    """
    head = max(1, base.shape[1] // 4)
    b_head = np.ascontiguousarray(base[:, :head].T)
    b_tail = np.linalg.norm(base[:, head:], axis=1) if base.shape[1] > head else np.zeros(len(base), np.float32)
    b_tail_max = float(b_tail.max()) if len(b_tail) else 0.0
    qs, bs = [], []
    for start in range(0, len(queries), block):
        q = queries[start : start + block]
        q_tail = np.linalg.norm(q[:, head:], axis=1)
        dots = q[:, :head] @ b_head
        qi, bi = np.nonzero(dots >= ((threshold - 1e-3) - q_tail * b_tail_max)[:, None])
        keep = dots[qi, bi] + q_tail[qi] * b_tail[bi] >= threshold - 1e-3
        qi, bi = qi[keep], bi[keep]
        if qi.size:
            full = np.einsum("ij,ij->i", q[qi], base[bi])
            hit = full >= threshold - 1e-6
            qs.append(qi[hit] + start)
            bs.append(bi[hit])
    if not qs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(qs).astype(np.int64), np.concatenate(bs).astype(np.int64)


def _pairs_gpu(queries: np.ndarray, base: np.ndarray, threshold: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    res = _gpu_resources()
    dist, ids = faiss.knn_gpu(res, queries, base, min(k, len(base)), metric=faiss.METRIC_INNER_PRODUCT)
    hit = (dist >= float(threshold) - 1e-6) & (ids >= 0)
    q = np.broadcast_to(np.arange(len(queries))[:, None], ids.shape)[hit]
    return q, ids[hit].astype(np.int64)


_GPU: list = []


def _gpu_resources():  # type: ignore[no-untyped-def]
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        raise StageError("dedup.faiss_gpu is set but this faiss has no GPU support or sees no GPU")
    if not _GPU:
        _GPU.append(faiss.StandardGpuResources())
    return _GPU[0]


def greedy_pointers(n: int, a: np.ndarray, b: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Per row, the index of its representative (-1 if it is one), from similar pairs (a[i], b[i]).

    Rows are visited by ascending ``rank``; a row points to the smallest-rank already-kept
    row it is similar to. Only rows in some pair are visited (a few percent), so the loop is
    per duplicate candidate, not per row.
    """
    pointer = np.full(n, -1, dtype=np.int64)
    keep = a != b
    src = np.concatenate([a[keep], b[keep]])
    dst = np.concatenate([b[keep], a[keep]])
    if src.size == 0:
        return pointer
    by_src = np.argsort(src, kind="stable")
    src, dst = src[by_src], dst[by_src]
    involved = np.unique(src)
    bounds = np.searchsorted(src, np.concatenate([involved, [n]]))
    start = dict(zip(involved.tolist(), bounds[:-1].tolist()))
    stop = dict(zip(involved.tolist(), bounds[1:].tolist()))
    kept = np.zeros(n, dtype=bool)
    for i in involved[np.argsort(rank[involved], kind="stable")].tolist():
        nbrs = dst[start[i] : stop[i]]
        earlier = nbrs[(rank[nbrs] < rank[i]) & kept[nbrs]]
        if earlier.size:
            pointer[i] = earlier[np.argmin(rank[earlier])]
        else:
            kept[i] = True
    return pointer


def near_duplicate_pointers(vectors: np.ndarray, order_rank: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy near-dup decision among a few vectors (exact all-pairs search)."""
    x = _normalise(vectors)
    if x.shape[0] < 2:
        return np.full(x.shape[0], -1, dtype=np.int64)
    a, b = _pairs_cpu(x, x, threshold)
    return greedy_pointers(x.shape[0], a, b, np.asarray(order_rank))


def cluster_range(bucket: int, n_buckets: int, n_clusters: int) -> tuple[int, int]:
    """Clusters [lo, hi) handled by one bucket (contiguous, near-equal)."""
    return bucket * n_clusters // n_buckets, (bucket + 1) * n_clusters // n_buckets


def dedup_near(bucket: int, work_dir: str, out_uri: str, config: DedupConfig, runs: list[str] | None = None) -> ShardStats:
    """Near-duplicate decisions for one bucket's clusters across the runs (module doc, step 3).

    ``runs``: run prefixes to read (default: every committed run under ``work_dir``).
    """
    stats = ShardStats(output_uri=out_uri)
    tree = Centroids.load(centroids_uri(work_dir))
    lo, hi = cluster_range(bucket, config.buckets, tree.n_leaves)
    decisions: list[pa.Table] = [DECISION_SCHEMA.empty_table()]
    with contextlib.ExitStack() as stack:
        loaded = []
        for prefix in list_runs(work_dir) if runs is None else runs:
            if not storage.exists(f"{prefix}.vec.npy"):
                continue
            vec = np.load(stack.enter_context(storage.local_copy(f"{prefix}.vec.npy")), mmap_mode="r")
            primary = np.load(stack.enter_context(storage.local_copy(f"{prefix}.primary.npy")), mmap_mode="r")
            visit = np.load(stack.enter_context(storage.local_copy(f"{prefix}.visit.npy")), mmap_mode="r")
            rank = np.load(stack.enter_context(storage.local_copy(f"{prefix}.rank.npy")), mmap_mode="r")
            p_lo, p_hi = np.searchsorted(primary, [lo, hi])
            # visitors: vectors whose 2nd..Nth probe falls in this bucket's clusters
            v_lo, v_hi = np.searchsorted(visit[:, 0], [lo, hi])
            mine = np.asarray(visit[v_lo:v_hi])
            loaded.append((vec, rank, primary, int(p_lo), int(p_hi), mine[:, 1], mine[:, 0]))
        pairs = queries = 0
        for cluster in range(lo, hi):
            base_parts, base_rank, q_parts, q_rank = [], [], [], []
            for vec, rank, primary, p_lo, p_hi, vis_row, vis_cluster in loaded:
                a, b = p_lo + np.searchsorted(primary[p_lo:p_hi], [cluster, cluster + 1])
                if b > a:
                    base_parts.append(np.asarray(vec[a:b], dtype=np.float32))
                    base_rank.append(np.asarray(rank[a:b]))
                v_a, v_b = np.searchsorted(vis_cluster, [cluster, cluster + 1])  # sorted by cluster
                rows = np.sort(vis_row[v_a:v_b])
                if rows.size:
                    q_parts.append(np.asarray(vec[rows], dtype=np.float32))
                    q_rank.append(np.asarray(rank[rows]))
            if not base_parts:
                continue
            base = np.ascontiguousarray(np.concatenate(base_parts))
            x = np.ascontiguousarray(np.concatenate(base_parts + q_parts))
            ranks = np.concatenate(base_rank + q_rank)
            if x.shape[0] < 2:
                continue
            if config.faiss_gpu:
                qa, qb = _pairs_gpu(x, base, config.near_dup_threshold, config.gpu_knn)
            else:
                qa, qb = similar_pairs(x, base, config.near_dup_threshold)
            queries += x.shape[0]
            pairs += int((qa != qb).sum())
            ra, rb = ranks[qa], ranks[qb]
            differ = ra != rb
            if differ.any():
                edge = np.unique(np.stack([np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ]], axis=1), axis=0)
                decisions.append(pa.table({"rank": edge[:, 0], "dup": edge[:, 1]}, schema=DECISION_SCHEMA))
            stats.add("success", int(base.shape[0]))
    out = pa.concat_tables(decisions)
    stats.bytes_written = storage.write_parquet(out_uri, out)
    stats.extra.update({"clusters": [lo, hi], "queries": queries, "pairs": pairs, "edges": out.num_rows})
    return stats.done()


# ---------------------------------------------------------------- 4. resolve


def resolve_verdicts(con, rows: str, edges: str, *, max_hops: int = 64, sql_rounds: int = 32) -> int:  # type: ignore[no-untyped-def]
    """Verdicts for the rows of one scope: creates table ``dd(rank, kind, dup)``, one row per dropped row.

    ``rows``: a relation with ``rank, ua1, ua2, sh1, sh2`` (the scope: every row for the snapshot-wide
    verdict, the rows one subset qualifies for in curate); ``edges``: a relation ``(rank, dup)`` of
    near-duplicate pairs (either order; pairs with a row outside the scope are ignored).

    The rules, stated in the README:

    1. Exact copies (same url and alt, or same image sha256) are one sample: each points to the
       smallest rank of its copies in the scope. Identity is transitive, so these pointers are followed.
    2. Near duplicates are *not* transitive: among the exact representatives, a row is dropped only
       in favour of a kept row it is itself similar to (greedy in rank order: the lexicographically
       first maximal independent set of the similarity graph). No chain A~B~C drops C for A.
    3. Because the scope is exactly the rows that qualify, every duplicate group with a qualifying
       member keeps one (its smallest qualifying rank is always kept).

    The greedy pass runs as rounds of joins (a row is decided once all its smaller-rank neighbours
    are); the few rows still open after ``sql_rounds`` (long chains) are finished in Python.
    Returns the number of rounds used.
    """
    con.execute(f"CREATE OR REPLACE TEMP TABLE sc AS SELECT rank, ua1, ua2, sh1, sh2 FROM ({rows})").fetchall()
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE ex AS
        WITH ua AS (SELECT ua1, ua2, min(rank) AS rep FROM sc WHERE ua1 IS NOT NULL GROUP BY ua1, ua2 HAVING count(*) > 1),
             sh AS (SELECT sh1, sh2, min(rank) AS rep FROM sc WHERE sh1 IS NOT NULL GROUP BY sh1, sh2 HAVING count(*) > 1),
             p AS (SELECT sc.rank, 0 AS kind, ua.rep AS dup FROM sc JOIN ua USING (ua1, ua2) WHERE sc.rank <> ua.rep
                   UNION ALL
                   SELECT sc.rank, 1 AS kind, sh.rep AS dup FROM sc JOIN sh USING (sh1, sh2) WHERE sc.rank <> sh.rep),
             m AS (SELECT rank, min(struct_pack(k := kind, d := dup)) AS m FROM p GROUP BY rank)
        SELECT rank, m.k AS kind, m.d AS dup FROM m
        """
    ).fetchall()
    for hop in range(max_hops + 1):
        # a copy whose representative is itself a copy (a url_alt pair that is also a sha256 pair) takes its pointer
        if not con.execute("SELECT count(*) FROM ex JOIN ex AS t ON ex.dup = t.rank").fetchall()[0][0]:
            break
        con.execute(
            "CREATE OR REPLACE TEMP TABLE ex AS SELECT ex.rank, ex.kind, coalesce(t.dup, ex.dup) AS dup "
            "FROM ex LEFT JOIN ex AS t ON ex.dup = t.rank"
        ).fetchall()
    else:
        raise StageError(f"dedup_resolve: exact-copy pointers did not converge in {max_hops} hops")
    # near pairs between exact representatives (a copy's pair is its representative's: the same sample)
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE e AS
        WITH g AS (SELECT rank, dup FROM ({edges})),
             root AS (SELECT sc.rank, coalesce(ex.dup, sc.rank) AS root FROM sc LEFT JOIN ex USING (rank)
                      WHERE sc.rank IN (SELECT rank FROM g UNION SELECT dup FROM g))
        SELECT DISTINCT greatest(a.root, b.root) AS hi, least(a.root, b.root) AS lo
        FROM g JOIN root AS a ON a.rank = g.rank JOIN root AS b ON b.rank = g.dup
        WHERE a.root <> b.root
        """
    ).fetchall()
    # state: 0 open, 1 kept, 2 dropped
    con.execute("CREATE OR REPLACE TEMP TABLE st AS SELECT hi AS rank, 0 AS s FROM e UNION SELECT lo, 0 FROM e").fetchall()
    rounds = 0
    while rounds < sql_rounds and con.execute("SELECT count(*) FROM st WHERE s = 0").fetchall()[0][0]:
        rounds += 1
        con.execute(
            """
            CREATE OR REPLACE TEMP TABLE st AS
            SELECT st.rank,
                   CASE WHEN st.s <> 0 THEN st.s
                        WHEN coalesce(n.kept, 0) > 0 THEN 2
                        WHEN coalesce(n.open, 0) = 0 THEN 1
                        ELSE 0 END AS s
            FROM st LEFT JOIN (
              SELECT e.hi AS rank, count_if(m.s = 1) AS kept, count_if(m.s <> 2) AS open
              FROM e JOIN st AS m ON m.rank = e.lo GROUP BY e.hi) AS n USING (rank)
            """
        ).fetchall()
    open_rows = con.execute("SELECT count(*) FROM st WHERE s = 0").fetchall()[0][0]
    if open_rows:
        _finish_greedy(con)
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE nd AS
        SELECT e.hi AS rank, min(e.lo) AS dup
        FROM e JOIN st AS k ON k.rank = e.lo AND k.s = 1 JOIN st AS x ON x.rank = e.hi AND x.s = 2
        GROUP BY e.hi
        """
    ).fetchall()
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE dd AS
        SELECT rank, 2 AS kind, dup FROM nd
        UNION ALL
        SELECT ex.rank, CASE WHEN nd.rank IS NULL THEN ex.kind ELSE 2 END AS kind, coalesce(nd.dup, ex.dup) AS dup
        FROM ex LEFT JOIN nd ON nd.rank = ex.dup
        """
    ).fetchall()
    return hop + rounds


def _finish_greedy(con) -> None:  # type: ignore[no-untyped-def]
    """The open rows of the greedy pass (long chains), decided in rank order in Python."""
    open_ranks = [r[0] for r in con.execute("SELECT rank FROM st WHERE s = 0 ORDER BY rank").fetchall()]
    state = dict(con.execute(
        "SELECT m.rank, m.s FROM e JOIN st AS o ON o.rank = e.hi AND o.s = 0 JOIN st AS m ON m.rank = e.lo"
    ).fetchall())
    lower: dict[int, list[int]] = {}
    for hi, lo in con.execute("SELECT e.hi, e.lo FROM e JOIN st AS o ON o.rank = e.hi AND o.s = 0").fetchall():
        lower.setdefault(hi, []).append(lo)
    for rank in open_ranks:
        state[rank] = 2 if any(state.get(lo) == 1 for lo in lower.get(rank, ())) else 1
    decided = pa.table({"rank": pa.array(open_ranks, pa.int64()), "s": pa.array([state[r] for r in open_ranks], pa.int32())})
    con.register("_decided", decided)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE st AS SELECT st.rank, coalesce(x.s, st.s) AS s FROM st LEFT JOIN _decided AS x USING (rank)"
    ).fetchall()
    con.unregister("_decided")


def dedup_resolve(
    work_dir: str, out_dir: str, config: DedupConfig, runs: list[str] | None = None,
    decisions: list[str] | None = None, max_hops: int = 64,
) -> ShardStats:
    """Exact groups plus near-dup decisions -> one verdict per row, in ``<out_dir>/<shard>.parquet``.

    ``runs`` / ``decisions``: what to read (default: everything under ``work_dir``).
    """
    stats = ShardStats(output_uri=out_dir)
    runs = [f"{p}.rows.parquet" for p in (list_runs(work_dir) if runs is None else runs)]
    if not runs:
        raise StageError(f"dedup_resolve: no runs under {storage.join(work_dir, 'runs')}")
    if decisions is None:
        decisions = storage.list_uris(storage.join(work_dir, "decisions"), ".parquet")
    with tempfile.TemporaryDirectory(prefix="laion-dedup-") as tmp, contextlib.ExitStack() as stack:
        con = _duckdb(config.memory_limit, Path(tmp) / "spill")
        run_files = [str(stack.enter_context(storage.local_copy(u))) for u in runs]
        near_files = [str(stack.enter_context(storage.local_copy(u))) for u in decisions]
        con.execute(f"CREATE VIEW r AS SELECT * FROM read_parquet({_sql_list(run_files)})").fetchall()
        near = f"SELECT rank, dup FROM read_parquet({_sql_list(near_files)})" if near_files else \
            "SELECT NULL::BIGINT AS rank, NULL::BIGINT AS dup WHERE false"
        with storage.atomic_local_path(pairs_uri(work_dir), suffix=".parquet") as pairs_tmp:
            con.execute(f"COPY (SELECT DISTINCT rank, dup FROM ({near})) TO '{pairs_tmp}' (FORMAT parquet)").fetchall()
        hop = resolve_verdicts(con, "SELECT * FROM r", near, max_hops=max_hops)
        con.execute("CREATE OR REPLACE TABLE d AS SELECT * FROM dd").fetchall()
        stats.extra["rounds"] = hop
        for kind, n in con.execute("SELECT kind, count(*) FROM d GROUP BY kind").fetchall():
            stats.add(f"drop:dup_{REASONS[kind]}", int(n))
        total = con.execute("SELECT count(*) FROM r").fetchall()[0][0]
        stats.add("kept", int(total) - sum(stats.counts.values()))
        reasons = "CASE d.kind " + " ".join(f"WHEN {i} THEN '{r}'" for i, r in enumerate(REASONS)) + " END"
        reader = con.sql(
            f"""
            SELECT r.uid, r.key, r.shard, t.uid AS dup_of, t.key AS dup_of_key, t.shard AS dup_of_shard,
                   {reasons} AS dup_reason, r.rank, r.ua1, r.ua2, r.sh1, r.sh2
            FROM r LEFT JOIN d ON d.rank = r.rank LEFT JOIN r AS t ON t.rank = d.dup
            ORDER BY r.shard, r.pos
            """
        ).to_arrow_reader(CHUNK_ROWS)
        stats.bytes_written = _write_per_shard(reader, out_dir)
        con.close()
    return stats.done()


def _write_per_shard(reader: pa.RecordBatchReader, out_dir: str) -> int:
    """Split a (shard, pos)-ordered stream into ``<out_dir>/<shard>.parquet`` files, a batch at a time."""
    written = 0
    current: str | None = None
    ctx: contextlib.ExitStack | None = None
    writer: pq.ParquetWriter | None = None
    path: Path | None = None

    def close() -> None:
        nonlocal written, ctx, writer
        if writer is not None and ctx is not None and path is not None:
            writer.close()
            written += path.stat().st_size
            ctx.close()
        writer = ctx = None

    try:
        for batch in reader:
            batch = pa.Table.from_batches([batch]).cast(OUTPUT_SCHEMA)
            shards = batch.column("shard").to_numpy(zero_copy_only=False)
            cuts = np.concatenate([[0], np.flatnonzero(shards[1:] != shards[:-1]) + 1, [len(shards)]])
            for a, b in zip(cuts[:-1], cuts[1:]):
                shard = str(shards[a])
                if shard != current:
                    close()
                    current = shard
                    ctx = contextlib.ExitStack()
                    path = ctx.enter_context(storage.atomic_local_path(storage.join(out_dir, f"{shard}.parquet"),
                                                                       suffix=".parquet"))
                    writer = pq.ParquetWriter(path, OUTPUT_SCHEMA, compression="zstd")
                assert writer is not None
                writer.write_table(batch.slice(int(a), int(b - a)))
        close()
    except BaseException as exc:
        if ctx is not None:
            if writer is not None:
                writer.close()
            ctx.__exit__(type(exc), exc, exc.__traceback__)
        raise
    return written


# ---------------------------------------------------------------- all steps in one process


def make_runs(shards: list[str], max_runs: int) -> list[list[str]]:
    """Contiguous near-equal runs of sorted shard ids (a run's ranks follow its index)."""
    shards = sorted(shards)
    size = max(1, math.ceil(len(shards) / max(1, max_runs)))
    return [shards[i : i + size] for i in range(0, len(shards), size)]


def dedup_all(
    shards: dict[str, tuple[str, ...]] | list[ShardInput],
    work_dir: str,
    out_dir: str,
    config: DedupConfig,
    clip: ClipConfig | None = None,
    max_runs: int = 16,
) -> ShardStats:
    """Run the four steps in this process (CLI, tests, benchmarks); the DAG maps them instead.

    ``shards``: ShardInputs, or shard id -> (download parquet, clip parquet or None,
    image embeddings or None[, tags parquet or None]).
    """
    clip = clip or ClipConfig()
    if isinstance(shards, dict):
        inputs = [ShardInput(k, *v) for k, v in shards.items()]
    else:
        inputs = list(shards)
    by_id = {s.shard: s for s in inputs}
    with_emb = [s for s in inputs if s.clip and s.embeddings]
    tree = None
    if config.near_dup and with_emb:
        tree = centroids_uri(work_dir)
        dedup_centroids(with_emb, tree, config)
    for old in storage.list_uris(storage.join(work_dir, "runs")) + storage.list_uris(storage.join(work_dir, "decisions")):
        storage.delete(old)
    for run, ids in enumerate(make_runs(list(by_id), max_runs)):
        dedup_partition([by_id[s] for s in ids], run, work_dir, config, clip, tree)
    if tree is not None:
        for bucket in range(config.buckets):
            dedup_near(bucket, work_dir, decision_uri(work_dir, bucket), config)
    return dedup_resolve(work_dir, out_dir, config)


# ---------------------------------------------------------------- the four steps' declarations
# centroids (one task, a sample) -> partition (lineage per download shard, computed one run
# per download batch) -> bucket (per bucket of clusters) -> resolve (pointers to final
# representatives, written per shard under dedup/). Near and resolve read only the runs of
# the current plan, so run files of an older grouping are ignored.

ELIGIBILITY_FIELDS = ("clip.*.threshold", "curate.require_clip_kept")
"""Which rows may represent a duplicate group (downloaded, CLIP-kept, not hash-list blocked):
decided when a run is partitioned (the rank's ineligible bit), so a threshold change re-partitions."""


def work_dir_for(root: str, snapshot: str) -> str:
    return storage.join(layout.snapshot_root(root, snapshot), "dedup_work")


def work_dir(ctx: Context) -> str:
    return work_dir_for(ctx.root, ctx.snapshot)


def _download_shards(ctx: Context) -> list[str]:
    from laion_tasks.stages.regroup import download_shard_ids

    return download_shard_ids(ctx)


def _inputs(ctx: Context, shards: list[str]) -> list[ShardInput]:
    root, snap = ctx.root, ctx.snapshot
    return [
        ShardInput(s, layout.images_parquet_uri(root, snap, s), layout.clip_parquet_uri(root, snap, s),
                   layout.clip_image_emb_uri(root, snap, s), layout.tags_parquet_uri(root, snap, s))
        for s in shards
    ]


def dedup_runs(ctx: Context) -> dict[int, list[str]]:
    """Run index -> its shards: the download batches (``runner.make_batches`` over the plan, as the
    DAG maps them), numbered by their first shard's position so ranks follow shard order."""
    from laion_tasks.runner import make_batches

    shards = _download_shards(ctx)
    return {shards.index(b[0]): b for b in make_batches(shards, ctx.settings.orchestration.max_mapped_tasks)}


def _run_of(ctx: Context, shard: str) -> tuple[int, list[str]] | None:
    for run, shards in dedup_runs(ctx).items():
        if shard in shards:
            return run, shards
    return None


def _current_runs(ctx: Context) -> list[str]:
    return [run_prefix(work_dir(ctx), run, shards) for run, shards in sorted(dedup_runs(ctx).items())]


def _partition_output(ctx: Context, shard: str) -> str:
    """The rows file of the run that holds the shard *now*: named by the run's members, so a shard
    that changed run (or whose run changed) has no output yet and is partitioned again."""
    found = _run_of(ctx, shard)
    if found is None:  # a shard that left the plan: its old run is simply no longer read
        return storage.join(work_dir(ctx), "runs", f"left-plan-{shard}.rows.parquet")
    return f"{run_prefix(work_dir(ctx), *found)}.rows.parquet"


def _run_centroids(ctx: Context, _: str) -> ShardStats:
    return dedup_centroids(_inputs(ctx, _download_shards(ctx)), centroids_uri(work_dir(ctx)), ctx.settings.dedup)


def _run_partition(ctx: Context, shard: str) -> ShardStats:
    """Lineage is per download shard; the work is per run: the first shard of a run that runs
    computes the whole run (once per batch), and each shard reports its own rows."""
    found = _run_of(ctx, shard)
    if found is None:
        raise StageError(f"dedup_partition: shard {shard} is not in the current download plan")
    run, shards = found
    config = ctx.settings.dedup
    centroids = centroids_uri(work_dir(ctx)) if config.near_dup else None
    run_stats = ctx.resource(
        f"dedup_run:{run}:{','.join(shards)}",
        lambda: dedup_partition(_inputs(ctx, shards), run, work_dir(ctx), config, ctx.settings.clip, centroids,
                                ctx.settings.curate),
    )
    stats = ShardStats(output_uri=run_stats.output_uri)
    with storage.local_copy(layout.images_parquet_uri(ctx.root, ctx.snapshot, shard)) as path:
        stats.add("success", pq.ParquetFile(path).metadata.num_rows)
    stats.extra.update({"run": run, "run_shards": len(shards)})
    return stats.done()


def _run_bucket(ctx: Context, bucket: str) -> ShardStats:
    """Buckets exist with near_dup off too (an empty decision file each): a mapped task over no
    batches would be skipped in Airflow, and resolve after it."""
    work = work_dir(ctx)
    if not ctx.settings.dedup.near_dup:
        out = decision_uri(work, int(bucket))
        return ShardStats(output_uri=out, bytes_written=storage.write_parquet(out, DECISION_SCHEMA.empty_table())).done()
    return dedup_near(int(bucket), work, decision_uri(work, int(bucket)), ctx.settings.dedup, _current_runs(ctx))


def _run_resolve(ctx: Context, _: str) -> ShardStats:
    config, work = ctx.settings.dedup, work_dir(ctx)
    decisions = [decision_uri(work, b) for b in range(config.buckets)] if config.near_dup else []
    runs = _current_runs(ctx)
    missing = [p for p in runs if not storage.exists(f"{p}.rows.parquet")]
    if missing:
        raise StageError(f"dedup_resolve: {len(missing)} run(s) of the current plan are not partitioned: "
                         + ", ".join(missing[:5]))
    stats = dedup_resolve(work, layout.dedup_dir(ctx.root, ctx.snapshot), config, runs, decisions)
    stats.extra["stale_run_files_removed"] = remove_stale_runs(work, runs)
    return stats


SPECS = {
    spec.name: spec
    for spec in (
        StageSpec(
            # A routing tree, not a result: trained once per knob set on a sample of the shards
            # scored by then, and kept when shards are added or re-scored, so that growing a crawl
            # does not re-partition every old shard. (Changing its knobs retrains it.)
            name="dedup_centroids",
            after=("tag",),
            mapped=False,
            reads=(),
            result_fields=("dedup.near_dup", "dedup.cluster_size", "dedup.near_dup_probes",
                           "dedup.kmeans_sample_per_cluster", "dedup.kmeans_iterations", "dedup.seed",
                           "dedup.memory_limit"),  # it caps the k-means sample
            output=lambda ctx, _: centroids_uri(work_dir(ctx)),
            run_shard=_run_centroids,
            shards=lambda ctx: ["centroids"] if ctx.settings.dedup.near_dup else [],
            plan_name="dedup_centroids",
            section="dedup",
        ),
        StageSpec(
            name="dedup_partition",
            reads=("download", "clip", "tag", "dedup_centroids"),
            result_fields=("dedup.near_dup", "dedup.near_dup_probes", *ELIGIBILITY_FIELDS),
            output=_partition_output,
            run_shard=_run_partition,
            shards=_download_shards,
            plan_name="shards",
            input_uri=lambda ctx, shard: layout.images_parquet_uri(ctx.root, ctx.snapshot, shard),
            section="dedup",
        ),
        StageSpec(
            name="dedup_bucket",
            reads=("dedup_partition", "dedup_centroids"),
            result_fields=("dedup.near_dup", "dedup.buckets", "dedup.near_dup_threshold", *ELIGIBILITY_FIELDS,
                           "dedup.faiss_gpu", "dedup.gpu_knn"),  # the GPU keeps the top gpu_knn within the threshold
            output=lambda ctx, bucket: decision_uri(work_dir(ctx), int(bucket)),
            run_shard=_run_bucket,
            shards=lambda ctx: [f"{b:05d}" for b in range(ctx.settings.dedup.buckets)],
            plan_name="dedup_bucket",
            input_uri=lambda ctx, _: storage.join(work_dir(ctx), "runs"),
            section="dedup",
        ),
        StageSpec(
            name="dedup",
            mapped=False,
            reads=("dedup_bucket", "dedup_partition"),
            result_fields=("dedup.near_dup", "dedup.buckets", "dedup.near_dup_threshold", *ELIGIBILITY_FIELDS,
                           "dedup.faiss_gpu", "dedup.gpu_knn"),
            output=lambda ctx, _: layout.dedup_dir(ctx.root, ctx.snapshot),
            run_shard=_run_resolve,
            shards=lambda ctx: ["resolve"],
            plan_name="dedup",
            input_uri=lambda ctx, _: work_dir(ctx),
            section="dedup",
        ),
    )
}
