"""Dedup step 1: the near-duplicate clusters, a two-level spherical k-means tree trained on a sample."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from laion_tasks import storage
from laion_tasks.config import DedupConfig, memory_bytes
from laion_tasks.stage import ShardStats, StageError
from laion_tasks.stages.dedup.common import (
    CHUNK_ROWS,
    ShardInput,
    _embedding_rows,
    _has_embedding,
    _normalise,
)

log = logging.getLogger(__name__)


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
        """(n, probes) leaf ids, nearest first, for normalised fp32 vectors (always ``probes`` columns).

        The ``top_probes`` (default ``2 * probes``) nearest top cells are searched for their
        ``probes`` nearest leaves each; the best ``probes`` of those are kept.
        """
        import faiss

        x = _normalise(x - self.mean)
        n = x.shape[0]
        wanted = max(1, probes)
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
        if wanted > probes:  # fewer leaves than probes (tiny data): the nearest again, it adds no work
            best = np.concatenate([best, np.repeat(best[:, :1], wanted - probes, axis=1)], axis=1)
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
