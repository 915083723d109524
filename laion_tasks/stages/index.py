"""Index stage: a FAISS kNN index over the CLIP image embeddings of one subset.

Output directory (``layout.index_dir(root, snapshot, subset)``):

* ``index.faiss``       the FAISS index; row id ``i`` is the i-th indexed sample. Opened
                         with ``IO_FLAG_MMAP`` so serving needs page cache, not heap.
* ``metadata.parquet``  one row per index id, sorted by ``id`` in small row groups, with
                         the subset's LAION columns (URL, TEXT, WIDTH, HEIGHT, similarity,
                         punsafe, ...). Written by DuckDB (the join of subset rows to CLIP
                         rows is out of core); read back per row group, never as a dict.
* ``metadata.arrow``    the same rows as uncompressed Arrow IPC, memory-mapped by the
                         query service for sub-millisecond id -> row lookups.
* ``index.json``        manifest (written last: its presence means the index is complete).

The index type is chosen by size and memory budget, as autofaiss does: exact ``Flat``
for small sets; for large ones an IVF with 4-bit fast-scan PQ codes whose candidates are
re-ranked with finer scalar-quantised codes (``Refine``), the finest that fits the budget.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from laion_tasks import layout, storage
from laion_tasks.config import IndexConfig
from laion_tasks.stage import Context, ShardStats, StageError, StageSpec

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
LOOKUP_FILE = "metadata.arrow"
MANIFEST_FILE = "index.json"
FORMAT_VERSION = 1

# Refinement codes from finest to coarsest, with their bytes per dimension.
_REFINE_CHOICES = (("SQfp16", 2.0), ("SQ8", 1.0), ("SQ4", 0.5))


@dataclass(frozen=True)
class IndexPlan:
    """What :func:`plan_index` chose, and why (kept in the manifest)."""

    key: str
    """FAISS index_factory string. Query-time knobs (nprobe, k_factor) are not part of it: the
    searcher sets them when it opens the index, so changing them rebuilds nothing."""
    estimated_bytes: int
    reason: str


def plan_index(n: int, dim: int, config: IndexConfig) -> IndexPlan:
    """Choose a FAISS index for ``n`` vectors of ``dim`` dimensions within the memory budget."""
    budget = int(config.memory_budget_gb * 1024**3)
    flat_bytes = n * dim * 4
    if config.index_key:
        return IndexPlan(config.index_key, flat_bytes, "index_key set in config")
    if n <= config.flat_max_vectors and flat_bytes <= budget:
        return IndexPlan("Flat", flat_bytes, f"{n} <= flat_max_vectors: exact search")
    nlist = int(2 ** round(math.log2(max(math.sqrt(n), 16))))
    nlist = max(16, min(nlist, 65_536, n // 39 or 16))
    # autofaiss' rule: an HNSW coarse quantizer once exhaustive centroid search gets costly.
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 4096 else f"IVF{nlist}"
    pq_m = _pq_subquantizers(dim)
    base_bytes = n * (pq_m // 2 + 8) + nlist * dim * 4  # 4-bit codes + 64-bit ids + centroids
    for refine, per_dim in _REFINE_CHOICES:
        total = base_bytes + int(n * dim * per_dim)
        if total <= budget:
            key = f"{coarse},PQ{pq_m}x4fs,Refine({refine})"
            return IndexPlan(key, total, f"IVF-PQ fast scan + {refine} re-rank fits {config.memory_budget_gb} GB")
    if base_bytes > budget:
        log.warning("even %s,PQ%dx4fs (%d bytes) exceeds the %.1f GB budget", coarse, pq_m, base_bytes, config.memory_budget_gb)
    key = f"{coarse},PQ{pq_m}x4fs"
    return IndexPlan(key, base_bytes, "no re-rank codes fit the budget: PQ only (lower recall)")


def _pq_subquantizers(dim: int) -> int:
    """One 4-bit sub-quantizer per 8 dims (64 for 512-d), at least 32 for small dims
    (fewer leave too coarse a candidate list to re-rank); even and dividing ``dim``."""
    m = max(2, dim // 8, min(32, dim // 2))
    while m > 2 and (dim % m or m % 2):
        m -= 1
    return m


def _columns(con, relation: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


@contextlib.contextmanager
def _local_copies(uris: list[str]) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [str(stack.enter_context(storage.local_copy(uri))) for uri in uris]


def _count_embedding_rows(path: str) -> tuple[int, int]:
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 2:
        raise StageError(f"{path}: embeddings must be 2-D, got shape {arr.shape}")
    return int(arr.shape[0]), int(arr.shape[1])


def _write_metadata(
    con,  # type: ignore[no-untyped-def]
    clip_paths: list[str],
    subset_paths: list[str] | None,
    out_path: Path,
    row_group_size: int,
    stats: ShardStats,
) -> int:
    """Join subset rows to CLIP rows, number them (= FAISS ids) and write metadata.parquet.

    Returns the number of rows to index. Every CLIP and subset row lands in a count.
    """
    con.execute(
        f"CREATE TEMP TABLE shard_files AS SELECT * FROM (SELECT unnest({_sql_list(clip_paths)}) AS filename, "
        f"unnest(range({len(clip_paths)})) AS shard)"
    )
    con.execute(
        f"CREATE TEMP VIEW clip AS SELECT c.*, f.shard AS _shard, c.file_row_number AS _row "
        f"FROM read_parquet({_sql_list(clip_paths)}, filename=true, file_row_number=true, union_by_name=true) c "
        f"JOIN shard_files f USING (filename)"
    )
    clip_cols = _columns(con, "clip")
    for needed in ("key", "has_embedding"):
        if needed not in clip_cols:
            raise StageError(f"CLIP metadata {clip_paths[0]}: column {needed!r} missing (have {clip_cols})")
    total_clip = con.execute("SELECT count(*) FROM clip").fetchone()[0]
    if subset_paths is None:
        keep_cols = [c for c in clip_cols if c not in ("filename", "file_row_number", "_shard", "_row")]
        select = ", ".join(f'c."{c}"' for c in keep_cols)
        source = f"SELECT {select}, c._shard, c._row FROM clip c WHERE c.has_embedding"
        no_emb = con.execute("SELECT count(*) FROM clip WHERE NOT coalesce(has_embedding, false)").fetchone()[0]
        stats.add("drop:no_embedding", no_emb)
    else:
        con.execute(f"CREATE TEMP VIEW subset AS SELECT * FROM read_parquet({_sql_list(subset_paths)}, union_by_name=true)")
        sub_cols = _columns(con, "subset")
        if "key" not in sub_cols:
            raise StageError(f"subset file {subset_paths[0]}: column 'key' missing (have {sub_cols})")
        join_cols = ["key"] + (["uid"] if "uid" in sub_cols and "uid" in clip_cols else [])
        on = " AND ".join(f's."{c}" = c."{c}"' for c in join_cols)
        select = ", ".join(f's."{c}"' for c in sub_cols)
        con.execute(
            f"CREATE TEMP TABLE joined AS SELECT {select}, c._shard, c._row, c.has_embedding AS _has_embedding "
            f"FROM subset s LEFT JOIN clip c ON {on}"
        )
        counts = dict(
            con.execute(
                "SELECT CASE WHEN _shard IS NULL THEN 'fail:not_in_clip' WHEN coalesce(_has_embedding, false) "
                "THEN 'kept' ELSE 'drop:no_embedding' END AS outcome, count(*) FROM joined GROUP BY 1"
            ).fetchall()
        )
        for outcome, n in counts.items():
            if outcome != "kept":
                stats.add(outcome, n)
        matched = con.execute("SELECT count(DISTINCT (_shard, _row)) FROM joined WHERE _shard IS NOT NULL").fetchone()[0]
        stats.add("drop:not_in_subset", total_clip - matched)
        source = f"SELECT {select}, _shard, _row FROM joined s WHERE _has_embedding"
    con.execute(
        f"COPY (SELECT (row_number() OVER (ORDER BY _shard, _row) - 1)::BIGINT AS id, * FROM ({source}) "
        f"ORDER BY id) TO '{out_path}' (FORMAT parquet, ROW_GROUP_SIZE {row_group_size}, COMPRESSION zstd)"
    )
    return int(con.execute(f"SELECT count(*) FROM read_parquet('{out_path}')").fetchone()[0])


def _iter_vectors(
    metadata_path: Path, embedding_paths: list[str], batch_size: int, ids: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """fp32, L2-normalised vectors in id order (all ids, or the sorted subset ``ids``).

    The id -> (shard, row) map is read from metadata.parquet a batch at a time, never whole:
    memory is one batch of ids and vectors, whatever the subset's size.
    """
    import pyarrow.parquet as pq

    source = pq.ParquetFile(metadata_path)
    pending: list[np.ndarray] = []
    pending_n = 0
    offset = 0
    open_shard, emb = -1, None
    for batch in source.iter_batches(batch_size=max(batch_size, 1), columns=["_shard", "_row"]):
        shards = batch.column(0).to_numpy()
        rows = batch.column(1).to_numpy()
        if ids is not None:
            lo, hi = np.searchsorted(ids, [offset, offset + len(shards)])
            pick = ids[lo:hi] - offset
            shards, rows = shards[pick], rows[pick]
        offset += batch.num_rows
        bounds = np.flatnonzero(np.diff(shards)) + 1
        for seg_start, seg_end in zip(np.r_[0, bounds], np.r_[bounds, len(shards)]):
            if seg_start == seg_end:
                continue
            if int(shards[seg_start]) != open_shard:
                open_shard = int(shards[seg_start])
                emb = np.load(embedding_paths[open_shard], mmap_mode="r")
            pending.append(np.asarray(emb[rows[seg_start:seg_end]], dtype=np.float32))  # type: ignore[index]
            pending_n += seg_end - seg_start
        if pending_n >= batch_size:
            yield _normalised(np.concatenate(pending))
            pending, pending_n = [], 0
    if pending:
        yield _normalised(np.concatenate(pending))


def _normalised(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return np.ascontiguousarray(x)


def _new_index(plan: IndexPlan, dim: int):  # type: ignore[no-untyped-def]
    import faiss

    return faiss.index_factory(dim, plan.key, faiss.METRIC_INNER_PRODUCT)


def _to_gpu_if_available(index):  # type: ignore[no-untyped-def]
    """Train on a GPU when faiss-gpu is installed; the stored index is always a CPU index."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except RuntimeError as exc:  # fast-scan and HNSW quantizers have no GPU version
        log.info("index stays on CPU: %s", exc)
        return index, False


def build_index(
    embedding_uris: list[str],
    clip_uris: list[str],
    out_dir: str,
    config: IndexConfig,
    subset_uris: list[str] | None = None,
) -> ShardStats:
    """Build the kNN index of ``out_dir`` from the CLIP stage's fp16 image embeddings.

    ``embedding_uris[i]`` (``clip/<shard>.img.npy``) holds the rows of ``clip_uris[i]``
    (``clip/<shard>.parquet``). With ``subset_uris`` (``subsets/<name>/*.parquet``) only the
    subset's samples are indexed, joined on ``key`` (and ``uid``), and their LAION columns
    become the search metadata; without it every CLIP row with an embedding is indexed.
    Counts: ``kept`` (indexed), ``drop:no_embedding``, ``drop:not_in_subset``, ``fail:not_in_clip``.
    """
    from laion_tasks import duck
    import faiss

    if len(embedding_uris) != len(clip_uris):
        raise StageError(f"{len(embedding_uris)} embedding files but {len(clip_uris)} CLIP metadata files")
    if not embedding_uris:
        raise StageError(f"no CLIP shards given for index {out_dir}")
    stats = ShardStats(output_uri=out_dir)
    timings: dict[str, float] = {}
    # One local copy of each input (a no-op for local roots), reused by every pass below.
    with tempfile.TemporaryDirectory(prefix="laion-index-") as tmp_name, _local_copies(clip_uris) as clip_paths, _local_copies(
        subset_uris or []
    ) as subset_paths, _local_copies(embedding_uris) as embedding_paths:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        con = duck.connect(config.duckdb_memory_limit, tmp / "duckdb")
        meta_path = tmp / METADATA_FILE
        n = _write_metadata(
            con, clip_paths, subset_paths if subset_uris is not None else None, meta_path, config.metadata_row_group_size, stats
        )
        _check_alignment(con, clip_paths, embedding_paths, embedding_uris)
        con.close()
        timings["metadata_s"] = time.perf_counter() - t0
        if n == 0:
            raise StageError(f"index {out_dir}: no sample with an embedding to index ({dict(stats.counts)})")
        dim = _count_embedding_rows(embedding_paths[0])[1]
        plan = plan_index(n, dim, config)
        log.info("index %s: %d vectors of %d dims -> %s (%s)", out_dir, n, dim, plan.key, plan.reason)

        t0 = time.perf_counter()
        index = _new_index(plan, dim)
        on_gpu = False
        if not index.is_trained:
            n_train = min(n, config.max_train_vectors)
            sample_ids = np.sort(np.random.default_rng(0).choice(n, n_train, replace=False))
            sample = np.concatenate(list(_iter_vectors(meta_path, embedding_paths, config.add_batch_size, sample_ids)))
            index, on_gpu = _to_gpu_if_available(index)
            index.train(sample)
            del sample
        timings["train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for batch in _iter_vectors(meta_path, embedding_paths, config.add_batch_size):
            index.add(batch)
        if on_gpu:
            index = faiss.index_gpu_to_cpu(index)
        timings["add_s"] = time.perf_counter() - t0
        if index.ntotal != n:
            raise StageError(f"index {out_dir}: added {index.ntotal} vectors but metadata has {n} rows")
        stats.add("kept", n)

        index_path = tmp / INDEX_FILE
        faiss.write_index(index, str(index_path))
        del index
        manifest = {
            "format_version": FORMAT_VERSION,
            "count": n,
            "dim": dim,
            "metric": "inner_product",
            "plan": asdict(plan),
            "built_at": time.time(),
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "counts": dict(stats.counts),
            "shards": len(clip_uris),
            "clip_uris": clip_uris,
            "subset_files": len(subset_uris or []),
        }
        _write_lookup(meta_path, tmp / LOOKUP_FILE)
        for name in (METADATA_FILE, LOOKUP_FILE, INDEX_FILE):
            stats.bytes_written += (tmp / name).stat().st_size
            with storage.atomic_local_path(storage.join(out_dir, name)) as dest:
                shutil.move(tmp / name, dest)  # a rename when on the same file system
        storage.write_text(storage.join(out_dir, MANIFEST_FILE), json.dumps(manifest, indent=2))
    stats.extra = {"index_key": plan.key, "dim": dim, **{k: round(v, 3) for k, v in timings.items()}}
    return stats.done()


def _write_lookup(parquet_path: Path, arrow_path: Path, batch_rows: int = 65_536) -> None:
    """An uncompressed Arrow IPC copy of the metadata for serving.

    Memory-mapped, a row costs a few page reads instead of decompressing a Parquet row
    group (~30 ms for 40 hits over 12 columns, measured), so the query path stays under
    a millisecond. Parquet stays the file for DuckDB and downstream tools.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pq.ParquetFile(parquet_path)
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_file(sink, source.schema_arrow) as writer:
        for batch in source.iter_batches(batch_size=batch_rows):
            writer.write_batch(batch)


def _check_alignment(con, clip_paths: list[str], embedding_paths: list[str], embedding_uris: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Each ``.img.npy`` must have exactly as many rows as its CLIP parquet."""
    rows = dict(
        con.execute(
            "SELECT _shard, count(*) FROM clip GROUP BY _shard"
        ).fetchall()
    )
    for shard, (path, uri) in enumerate(zip(embedding_paths, embedding_uris)):
        n_emb, _ = _count_embedding_rows(path)
        if n_emb != rows.get(shard, 0):
            raise StageError(f"{uri}: {n_emb} embedding rows but {clip_paths[shard]} has {rows.get(shard, 0)} rows")


# -- the stage's declaration ---------------------------------------------------------


ALL_SAMPLES = "_all"
"""The index over every CLIP row with an embedding, not a subset's (``laion index`` without ``--subset``)."""


def _index_dir(ctx: Context, subset: str) -> str:
    return ctx.uri("index_dir", layout.index_dir(ctx.root, ctx.snapshot, subset))


def _run_index(ctx: Context, subset: str) -> ShardStats:
    from laion_tasks.stages.regroup import download_shard_ids

    root, snap = ctx.root, ctx.snapshot
    shards = download_shard_ids(ctx)
    embeddings = [layout.clip_image_emb_uri(root, snap, s) for s in shards]
    clips = [layout.clip_parquet_uri(root, snap, s) for s in shards]
    subset_parts = None if subset == ALL_SAMPLES else storage.list_uris(layout.subset_dir(root, snap, subset), ".parquet")
    return build_index(embeddings, clips, _index_dir(ctx, subset), ctx.settings.index, subset_uris=subset_parts)


SPEC = StageSpec(
    name="index",
    downstream=True,
    reads=("curate", "clip"),  # the subset of the same name; every shard's embeddings
    # Not nprobe / k_factor: query-time knobs the searcher sets when it opens an index (serve passes them).
    result_fields=(
        "index.memory_budget_gb",
        "index.flat_max_vectors",
        "index.hnsw_m",
        "index.index_key",
        "index.max_train_vectors",
        "index.metadata_row_group_size",
    ),
    output=lambda ctx, subset: storage.join(_index_dir(ctx, subset), MANIFEST_FILE),
    run_shard=_run_index,
    shards=lambda ctx: list(ctx.settings.index.subsets),
    plan_name="subsets",
    input_uri=lambda ctx, subset: layout.subset_dir(ctx.root, ctx.snapshot, subset),
    section="index",
    after_batch=lambda ctx, shards: {"index_dirs": [_index_dir(ctx, s) for s in shards]},
)
