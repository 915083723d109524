"""PEER for bench/dedup_bench.py: the bucketed dedup this project shipped before issue 15 (commit 316d006),
kept verbatim except for its config class, so the benchmark can run old and new in the same process.

Snapshot-wide deduplication: exact (url, alt), exact image sha256, near-duplicate embeddings.

It scales by partitioning, never by one in-memory set of the whole snapshot:

1. ``dedup_centroids`` (one task, only for near-dups): spherical k-means with
   ``dedup.buckets`` centroids on a fixed-size sample of each shard's image embeddings.
2. ``dedup_partition`` (mapped per shard): every row emits up to three entries, one
   per criterion, each routed to a bucket: ``url_alt`` and ``sha256`` by a prefix of
   their hash, ``near_embedding`` by the nearest centroid. Writes
   ``<work>/buckets/<bucket>/<shard>.parquet`` plus ``<work>/rows/<shard>.parquet``.
3. ``dedup_bucket`` (mapped per bucket): decides within the bucket. Exact criteria:
   the representative of a group is its smallest (key, shard); the others point to it.
   Near-dups: faiss inner-product range search (cosine >= ``near_dup_threshold`` on
   L2-normalised embeddings), then a greedy pass in (key, shard) order: a row is a
   representative unless an earlier *representative* is within the threshold, in which
   case it points to the smallest such one. So every removed row is within the
   threshold of the row it points to (no chaining A~B~C that removes C for B).
4. ``dedup_resolve`` (one task, DuckDB, spills to disk): per row, the first criterion
   that removed it (url_alt > sha256 > near_embedding) gives ``dup_reason``; pointers
   are followed to the final representative (they always go to a smaller (key, shard),
   so chains end). Writes ``<out>/<shard>.parquet``: one row per input row with
   ``uid, key, shard, dup_of, dup_of_key, dup_of_shard, dup_reason`` (null for representatives).

The global minimum (key, shard) of any group of rows linked by the three criteria is
a representative under every criterion, so each linked group keeps at least one row.

Trade-off of near-dup bucketing: a pair of near-duplicates that shares none of its
``near_dup_probes`` nearest k-means cells is missed (more probes: fewer misses, more work);
in exchange each bucket is an independent task whose cost is quadratic only in the
bucket size. Choose ``dedup.buckets`` so a bucket holds at most ~50k embeddings on CPU
(e.g. rows / 20,000); a GPU faiss build makes larger buckets cheap.

``uid`` is sha256(url NUL alt) from the extract stage, so exact (url, alt) duplicates
share a uid: join these verdicts on (shard, key), not on uid.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import storage
from laion_tasks.stage import read_parquet, ShardStats, StageError

log = logging.getLogger(__name__)


@dataclass
class DedupConfig:
    """The old ``dedup`` config section."""

    buckets: int = 64
    near_dup_threshold: float = 0.95
    near_dup: bool = True
    near_dup_probes: int = 2
    centroid_sample_per_shard: int = 2000
    seed: int = 0
    resolve_memory_limit: str = "4GB"

REASONS = ("url_alt", "sha256", "near_embedding")
"""Criterion ids 0, 1, 2; also the precedence of ``dup_reason``."""

ENTRY_SCHEMA_FIELDS = [
    ("uid", pa.string()),
    ("key", pa.string()),
    ("shard", pa.string()),
    ("kind", pa.int8()),
    ("digest", pa.binary(16)),
]
DECISION_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("shard", pa.string()),
        ("kind", pa.int8()),
        ("dup_of", pa.string()),
        ("dup_of_key", pa.string()),
        ("dup_of_shard", pa.string()),
    ]
)
OUTPUT_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("shard", pa.string()),
        ("dup_of", pa.string()),
        ("dup_of_key", pa.string()),
        ("dup_of_shard", pa.string()),
        ("dup_reason", pa.string()),
    ]
)


def bucket_name(bucket: int) -> str:
    return f"{bucket:05d}"


def bucket_dir(work_dir: str, bucket: int) -> str:
    return storage.join(work_dir, "buckets", bucket_name(bucket))


def rows_uri(work_dir: str, shard: str) -> str:
    return storage.join(work_dir, "rows", f"{shard}.parquet")


def _write_parquet(uri: str, table: pa.Table) -> int:
    with storage.atomic_local_path(uri, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
        return tmp.stat().st_size


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _embedding_table(clip_parquet_uri: str, img_emb_uri: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, has_embedding mask and fp32 normalised embeddings (only rows that have one) of a clip shard."""
    clip = read_parquet(clip_parquet_uri, "clip parquet", None)
    keys = [str(k) for k in clip.column("key").to_pylist()]
    has = (
        np.asarray(clip.column("has_embedding").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
        if "has_embedding" in clip.column_names
        else np.ones(len(keys), dtype=bool)
    )
    with storage.local_copy(img_emb_uri) as path:
        emb = np.load(path, mmap_mode="r")
        if emb.shape[0] == len(keys):
            vectors = _normalise(emb[has])
        elif emb.shape[0] == int(has.sum()):
            vectors = _normalise(emb[:])
        else:
            raise StageError(f"{img_emb_uri}: {emb.shape[0]} embedding rows do not match {len(keys)} clip rows")
    return keys, has, vectors


# ---------------------------------------------------------------- 1. centroids


def dedup_centroids(
    clip_parquet_uris: list[str], img_emb_uris: list[str], out_uri: str, config: DedupConfig
) -> ShardStats:
    """Train ``config.buckets`` spherical k-means centroids on a per-shard sample; write them as fp32 .npy."""
    import faiss

    stats = ShardStats(output_uri=out_uri)
    rng = np.random.default_rng(config.seed)
    samples = []
    for clip_uri, emb_uri in zip(clip_parquet_uris, img_emb_uris, strict=True):
        _, _, vectors = _embedding_table(clip_uri, emb_uri)
        take = min(config.centroid_sample_per_shard, vectors.shape[0])
        if take:
            samples.append(vectors[np.sort(rng.choice(vectors.shape[0], take, replace=False))])
        stats.add("success")
    if not samples:
        raise StageError("dedup_centroids: no shard has image embeddings")
    x = np.ascontiguousarray(np.concatenate(samples))
    k = min(config.buckets, x.shape[0])
    kmeans = faiss.Kmeans(x.shape[1], k, niter=20, seed=config.seed, spherical=True, verbose=False)
    kmeans.train(x)
    centroids = kmeans.centroids.astype(np.float32)
    with storage.atomic_local_path(out_uri, suffix=".npy") as tmp:
        with open(tmp, "wb") as handle:  # a file object: np.save would append ".npy" to the temp name
            np.save(handle, centroids)
        stats.bytes_written = tmp.stat().st_size
    stats.extra.update({"sample_rows": int(x.shape[0]), "centroids": int(k)})
    return stats.done()


# ---------------------------------------------------------------- 2. partition


def _fixed_binary(rows: np.ndarray, width: int) -> pa.Array:
    """(N, width) uint8 rows as a fixed_size_binary array without a Python loop."""
    data = np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(data) // width if width else 0,
                                                [None, pa.py_buffer(data.tobytes())])


def _digest_bucket(digests: np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucket from the first 8 bytes of each 16-byte digest ("hash prefix")."""
    prefix = digests[:, :8].copy().view(">u8").ravel()
    return (prefix % np.uint64(n_buckets)).astype(np.int64)


def dedup_partition(
    images_parquet_uri: str,
    clip_parquet_uri: str | None,
    img_emb_uri: str | None,
    shard: str,
    work_dir: str,
    config: DedupConfig,
    centroids_uri: str | None = None,
) -> ShardStats:
    """Route one shard's rows into bucket files (one entry per criterion that applies to the row)."""
    stats = ShardStats(output_uri=storage.join(work_dir, "buckets"))
    n_buckets = config.buckets
    table = read_parquet(images_parquet_uri, "download parquet")
    cols = table.column_names
    keys = [str(k) for k in table.column("key").to_pylist()]
    n = len(keys)
    uids = table.column("uid").to_pylist() if "uid" in cols else [None] * n
    urls = table.column("url").to_pylist() if "url" in cols else [None] * n
    alts = table.column("caption").to_pylist() if "caption" in cols else [None] * n
    shas = table.column("sha256").to_pylist() if "sha256" in cols else [None] * n

    entries_kind: list[np.ndarray] = []
    entries_row: list[np.ndarray] = []
    entries_digest: list[np.ndarray] = []
    entries_bucket: list[np.ndarray] = []

    # url_alt: sha256(url NUL alt), the extract stage's uid formula (full 16 bytes)
    rows = [i for i in range(n) if urls[i]]
    if rows:
        d = np.frombuffer(
            b"".join(hashlib.sha256(f"{urls[i]}\x00{alts[i] or ''}".encode("utf-8", "surrogatepass")).digest()[:16]
                     for i in rows), dtype=np.uint8).reshape(-1, 16)
        entries_kind.append(np.zeros(len(rows), np.int8))
        entries_row.append(np.array(rows))
        entries_digest.append(d)
        entries_bucket.append(_digest_bucket(d, n_buckets))
    # sha256 of the original image bytes
    rows = []
    digests = []
    for i in range(n):
        if shas[i]:
            try:
                digests.append(bytes.fromhex(shas[i])[:16])
                rows.append(i)
            except ValueError:
                stats.add("bad:sha256_not_hex")
    if rows:
        d = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 16)
        entries_kind.append(np.ones(len(rows), np.int8))
        entries_row.append(np.array(rows))
        entries_digest.append(d)
        entries_bucket.append(_digest_bucket(d, n_buckets))

    vectors = np.zeros((0, 0), np.float32)
    near_rows = np.zeros(0, dtype=np.int64)
    near_bucket = np.zeros(0, dtype=np.int64)
    if config.near_dup and clip_parquet_uri and img_emb_uri and centroids_uri:
        import faiss

        clip_keys, has, vectors = _embedding_table(clip_parquet_uri, img_emb_uri)
        row_of = {k: i for i, k in enumerate(keys)}
        emb_keys = [k for k, h in zip(clip_keys, has) if h]
        near_rows = np.array([row_of.get(k, -1) for k in emb_keys], dtype=np.int64)
        if (near_rows < 0).any():
            raise StageError(f"{clip_parquet_uri}: {int((near_rows < 0).sum())} keys are not in {images_parquet_uri}")
        with storage.local_copy(centroids_uri) as path:
            centroids = np.load(path).astype(np.float32)
        if centroids.shape[1] != vectors.shape[1] and vectors.shape[0]:
            raise StageError(f"{centroids_uri}: {centroids.shape[1]}-d centroids for {vectors.shape[1]}-d embeddings")
        if vectors.shape[0]:
            index = faiss.IndexFlatIP(centroids.shape[1])
            index.add(centroids)
            probes = max(1, min(config.near_dup_probes, centroids.shape[0]))
            cells = index.search(vectors, probes)[1].astype(np.int64) % n_buckets
            # an embedding goes to each of its `probes` nearest cells (once per distinct bucket)
            first = np.ones_like(cells, dtype=bool)
            for p in range(1, probes):
                first[:, p] = (cells[:, :p] != cells[:, p : p + 1]).all(axis=1)
            rows_idx = np.repeat(np.arange(len(near_rows))[:, None], probes, axis=1)[first]
            near_bucket = cells[first]
            vectors = vectors[rows_idx]
            near_rows = near_rows[rows_idx]

    uid_arr = pa.array([None if u is None else str(u) for u in uids], pa.string())
    key_arr = pa.array(keys, pa.string())
    kind = np.concatenate(entries_kind) if entries_kind else np.zeros(0, np.int8)
    row = np.concatenate(entries_row) if entries_row else np.zeros(0, np.int64)
    digest = np.concatenate(entries_digest) if entries_digest else np.zeros((0, 16), np.uint8)
    bucket = np.concatenate(entries_bucket) if entries_bucket else np.zeros(0, np.int64)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    emb16 = vectors.astype(np.float16)

    written = 0
    for b in np.unique(np.concatenate([bucket, near_bucket])):
        sel = np.flatnonzero(bucket == b)
        nsel = np.flatnonzero(near_bucket == b)
        r = np.concatenate([row[sel], near_rows[nsel]])
        k = np.concatenate([kind[sel], np.full(len(nsel), 2, np.int8)])
        dig = pa.concat_arrays([_fixed_binary(digest[sel], 16), pa.nulls(len(nsel), pa.binary(16))])
        emb_type = pa.binary(2 * dim) if dim else pa.binary(2)
        embs = pa.concat_arrays(
            [pa.nulls(len(sel), emb_type), _fixed_binary(emb16[nsel].view(np.uint8), emb_type.byte_width)]
        )
        part = pa.table(
            {
                "uid": uid_arr.take(pa.array(r)),
                "key": key_arr.take(pa.array(r)),
                "shard": pa.array([shard] * len(r), pa.string()),
                "kind": pa.array(k, pa.int8()),
                "digest": dig,
                "emb": embs,
            }
        )
        written += _write_parquet(storage.join(bucket_dir(work_dir, int(b)), f"{shard}.parquet"), part)
    written += _write_parquet(rows_uri(work_dir, shard), pa.table({"uid": uid_arr, "key": key_arr}))
    stats.add("success", n)
    stats.bytes_written = written
    stats.extra.update({"entries": {r: int((kind == i).sum()) for i, r in enumerate(REASONS[:2])} | {
        "near_embedding": int(len(near_rows))}})
    return stats.done()


# ---------------------------------------------------------------- 3. bucket


def _exact_decisions(table: pa.Table) -> pa.Table:
    """Rows that are not the smallest (key, shard) of their (kind, digest) group, pointing to it."""
    import duckdb

    con = duckdb.connect()
    con.register("entries", table)
    return con.sql(
        """
        SELECT uid, key, shard, kind, dup_of, dup_of_key, dup_of_shard FROM (
          SELECT uid, key, shard, kind,
                 first(uid) OVER g AS dup_of, first(key) OVER g AS dup_of_key, first(shard) OVER g AS dup_of_shard,
                 row_number() OVER g AS rn
          FROM entries WHERE kind < 2
          WINDOW g AS (PARTITION BY kind, digest ORDER BY key, shard ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
        ) WHERE rn > 1
        """
    ).to_arrow_table()


def near_duplicate_pointers(vectors: np.ndarray, order_rank: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy near-dup decision. Returns, per row, the index of its representative, or -1 if it is one.

    Rows are visited by ``order_rank`` (ascending); a row points to the earliest
    already-kept row with cosine >= threshold.
    """
    import faiss

    n = vectors.shape[0]
    pointer = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return pointer
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _dist, ids = index.range_search(x, float(threshold) - 1e-6)
    order = np.argsort(order_rank, kind="stable")
    kept = np.zeros(n, dtype=bool)
    for i in order:
        nbrs = ids[lims[i]:lims[i + 1]]
        earlier = nbrs[(order_rank[nbrs] < order_rank[i]) & kept[nbrs]]
        if earlier.size:
            pointer[i] = earlier[np.argmin(order_rank[earlier])]
        else:
            kept[i] = True
    return pointer


def dedup_bucket(bucket_uris: list[str], out_uri: str, config: DedupConfig) -> ShardStats:
    """Decide duplicates within one bucket; write only the removed entries with their representative."""
    stats = ShardStats(output_uri=out_uri)
    parts = [read_parquet(u, "dedup bucket piece") for u in bucket_uris]
    parts = [p for p in parts if p.num_rows]
    table = pa.concat_tables(parts, promote_options="permissive") if parts else None
    decisions = [DECISION_SCHEMA.empty_table()]
    if table is not None:
        exact = table.drop_columns(["emb"])
        decisions.append(_exact_decisions(exact).cast(DECISION_SCHEMA))
        near = table.filter(pa.compute.equal(table.column("kind"), 2))
        if near.num_rows and config.near_dup:
            raw = near.column("emb").combine_chunks()
            dim = raw.type.byte_width // 2 if pa.types.is_fixed_size_binary(raw.type) else len(raw[0].as_py()) // 2
            vectors = np.frombuffer(b"".join(v.as_py() for v in raw), dtype=np.float16).reshape(-1, dim)
            keys = near.column("key").to_pylist()
            shards = near.column("shard").to_pylist()
            rank = np.empty(len(keys), dtype=np.int64)
            rank[sorted(range(len(keys)), key=lambda j: (keys[j], shards[j]))] = np.arange(len(keys))
            pointer = near_duplicate_pointers(_normalise(vectors), rank, config.near_dup_threshold)
            dup = np.flatnonzero(pointer >= 0)
            if dup.size:
                target = pointer[dup]
                decisions.append(
                    pa.table(
                        {
                            "uid": near.column("uid").take(pa.array(dup)),
                            "key": near.column("key").take(pa.array(dup)),
                            "shard": near.column("shard").take(pa.array(dup)),
                            "kind": pa.array(np.full(dup.size, 2, np.int8)),
                            "dup_of": near.column("uid").take(pa.array(target)),
                            "dup_of_key": near.column("key").take(pa.array(target)),
                            "dup_of_shard": near.column("shard").take(pa.array(target)),
                        },
                        schema=DECISION_SCHEMA,
                    )
                )
    out = pa.concat_tables(decisions).sort_by([("shard", "ascending"), ("key", "ascending")])
    # outcomes are per entry (a row has up to one entry per criterion): representative or removed
    dup_kinds = out.column("kind").to_numpy()
    stats.add("kept", (table.num_rows if table is not None else 0) - out.num_rows)
    for i, reason in enumerate(REASONS):
        stats.add(f"drop:dup_{reason}", int((dup_kinds == i).sum()))
    stats.bytes_written = _write_parquet(out_uri, out)
    return stats.done()


# ---------------------------------------------------------------- 4. resolve


def dedup_resolve(decision_uris: list[str], work_dir: str, shards: list[str], out_dir: str, config: DedupConfig,
                  max_hops: int = 64) -> ShardStats:
    """Combine bucket decisions into one verdict per row and write ``<out_dir>/<shard>.parquet`` per shard."""
    import duckdb

    stats = ShardStats(output_uri=out_dir)
    with tempfile.TemporaryDirectory(prefix="laion-dedup-") as tmp, contextlib.ExitStack() as stack:
        tmpdir = Path(tmp)
        files = [str(stack.enter_context(storage.local_copy(uri))) for uri in decision_uris]
        con = duckdb.connect()
        # duckdb 2 keeps an execute() result open until fetched: fetch every statement's result
        con.execute(f"SET memory_limit='{config.resolve_memory_limit}'").fetchall()
        con.execute(f"SET temp_directory='{tmpdir / 'spill'}'").fetchall()
        con.execute("SET preserve_insertion_order=false").fetchall()
        if files:
            # one decision per row: the first criterion, then the smallest representative (deterministic)
            con.execute(
                "CREATE TABLE d AS SELECT shard, key, dup_of, dup_of_key, dup_of_shard, kind FROM read_parquet(?) "
                "QUALIFY row_number() OVER (PARTITION BY shard, key ORDER BY kind, dup_of_key, dup_of_shard) = 1",
                [files],
            ).fetchall()
        else:
            con.execute("CREATE TABLE d (shard VARCHAR, key VARCHAR, dup_of VARCHAR, dup_of_key VARCHAR, "
                        "dup_of_shard VARCHAR, kind TINYINT)").fetchall()
        for hop in range(max_hops + 1):
            # one pointer-jumping step: a row whose representative is itself removed takes that row's pointer
            moved = con.execute(
                "SELECT count(*) FROM d JOIN d AS t ON d.dup_of_shard = t.shard AND d.dup_of_key = t.key"
            ).fetchall()[0][0]
            if not moved:
                break
            con.execute(
                """
                CREATE OR REPLACE TABLE d AS
                SELECT d.shard, d.key, coalesce(t.dup_of, d.dup_of) AS dup_of,
                       coalesce(t.dup_of_key, d.dup_of_key) AS dup_of_key,
                       coalesce(t.dup_of_shard, d.dup_of_shard) AS dup_of_shard, d.kind
                FROM d LEFT JOIN d AS t ON d.dup_of_shard = t.shard AND d.dup_of_key = t.key
                """
            ).fetchall()
        else:
            raise StageError(f"dedup_resolve: representative pointers did not converge in {max_hops} hops")
        stats.extra["hops"] = hop
        reasons = "CASE kind " + " ".join(f"WHEN {i} THEN '{r}'" for i, r in enumerate(REASONS)) + " END"
        for shard in shards:
            rows = read_parquet(rows_uri(work_dir, shard), "dedup rows")
            rows = rows.append_column("pos", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
            con.register("r", rows)
            table = con.sql(
                f"""
                SELECT r.uid, r.key, ? AS shard, d.dup_of, d.dup_of_key, d.dup_of_shard, {reasons} AS dup_reason
                FROM r LEFT JOIN d ON d.shard = ? AND d.key = r.key
                ORDER BY r.pos
                """,
                params=[shard, shard],
            ).to_arrow_table()
            con.unregister("r")
            table = table.cast(OUTPUT_SCHEMA)
            stats.bytes_written += _write_parquet(storage.join(out_dir, f"{shard}.parquet"), table)
            reason_col = table.column("dup_reason").to_pylist()
            stats.add("kept", sum(r is None for r in reason_col))
            for r in REASONS:
                stats.add(f"drop:dup_{r}", sum(x == r for x in reason_col))
    return stats.done()


# ---------------------------------------------------------------- all steps in one process


def dedup_all(
    shards: dict[str, tuple[str, str | None, str | None]],
    work_dir: str,
    out_dir: str,
    config: DedupConfig,
) -> ShardStats:
    """Run the four steps in this process (CLI, tests, benchmarks); the DAG maps them instead.

    ``shards``: shard id -> (download parquet, clip parquet or None, image embeddings or None).
    """
    stats = ShardStats(output_uri=out_dir)
    with_emb = [(c, e) for _, c, e in shards.values() if c and e]
    centroids_uri = None
    if config.near_dup and with_emb:
        centroids_uri = storage.join(work_dir, "centroids.npy")
        dedup_centroids([c for c, _ in with_emb], [e for _, e in with_emb], centroids_uri, config)
    for shard, (images, clip, emb) in sorted(shards.items()):
        dedup_partition(images, clip, emb, shard, work_dir, config, centroids_uri)
    decisions = []
    for b in range(config.buckets):
        pieces = storage.list_uris(bucket_dir(work_dir, b), ".parquet")
        if pieces:
            out = storage.join(work_dir, "decisions", f"{bucket_name(b)}.parquet")
            dedup_bucket(pieces, out, config)
            decisions.append(out)
    stats.merge(dedup_resolve(decisions, work_dir, sorted(shards), out_dir, config))
    return stats.done()
