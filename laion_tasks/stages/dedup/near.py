"""Dedup step 3: near-duplicate pairs inside each cluster of a bucket, exact within the threshold."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pyarrow as pa

from laion_tasks import storage
from laion_tasks.config import DedupConfig
from laion_tasks.stage import ShardStats, StageError
from laion_tasks.stages.dedup.common import (
    DECISION_SCHEMA,
    _normalise,
    centroids_uri,
    list_runs,
)
from laion_tasks.stages.dedup.centroids import Centroids

log = logging.getLogger(__name__)


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
