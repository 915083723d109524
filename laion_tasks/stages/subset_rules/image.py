"""DataComp's image-based clustering rule: the pool's clusters hit by a target set (dedup's centroids reused)."""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_tasks import layout, storage
from laion_tasks.config import ClipConfig, CurateConfig, DedupConfig, SubsetConfig
from laion_tasks.snapshot_db import SnapshotDB, table_dir
from laion_tasks.stage import StageError

from laion_tasks.stages.subset_rules.common import _MEMBERS, REUSE_FACTOR, _narrow

log = logging.getLogger(__name__)


# -- the image-cluster rule -----------------------------------------------------------------


def _image_files(root: Path) -> list[Path]:
    from laion_tasks.stages.evaluate.datasets import IMAGE_EXTENSIONS

    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


@functools.lru_cache(maxsize=8)
def _embed_folder(directory: str, model: str, pretrained: str | None, checkpoint: str | None, device: str, seed: int) -> np.ndarray:
    """L2-normalised image embeddings of every image under ``directory`` (cached: the card asks again)."""
    import torch
    from PIL import Image

    from laion_tasks.models.clip import cached_clip, encode_images

    files = _image_files(Path(directory))
    if not files:
        raise StageError(f"image_targets {directory}: no image files")
    clip = cached_clip(model, pretrained, checkpoint, device, seed)
    out = []
    for start in range(0, len(files), 64):
        batch = []
        for path in files[start : start + 64]:
            try:
                with Image.open(path) as img:
                    batch.append(clip.preprocess(img.convert("RGB")))
            except OSError as exc:
                raise StageError(f"image_targets {path}: not a readable image: {exc}") from exc
        out.append(encode_images(clip, torch.stack(batch)).numpy())
    return np.concatenate(out).astype(np.float32)


def target_embeddings(spec: str, clip: ClipConfig) -> tuple[np.ndarray, str]:
    """(normalised fp32 embeddings, how they were made) of the image rule's target set."""
    if spec.endswith(".npy"):
        try:
            with storage.local_copy(spec) as path:
                x = np.load(path, allow_pickle=False)
        except (OSError, ValueError, storage.StorageError) as exc:
            raise StageError(f"image_targets {spec}: cannot read embeddings: {exc}") from exc
        if x.ndim != 2 or not len(x):
            raise StageError(f"image_targets {spec}: expected a non-empty (n, d) array, got shape {x.shape}")
        x = x.astype(np.float32)
        how = "embeddings file"
    else:
        directory = storage.local_path(spec)
        if not directory.is_dir():
            raise StageError(f"image_targets {spec}: neither an ImageFolder directory nor a .npy file")
        m = clip.english
        x = _embed_folder(str(directory), m.model, m.pretrained, m.checkpoint, clip.device, clip.seed)
        how = f"images embedded with {m.model}" + (f" ({m.checkpoint or m.pretrained})" if (m.checkpoint or m.pretrained) else "")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), how


class _Pool(abc.ABC):
    """The pool's image embeddings clustered: centroids, and which pool samples are in given clusters."""

    source: str
    vectors: int

    def __init__(self, centroids: Any) -> None:
        self.centroids = centroids

    @property
    def clusters(self) -> int:
        return int(self.centroids.n_leaves)

    def nearest(self, targets: np.ndarray) -> np.ndarray:
        """Each target's nearest leaf, searched exhaustively (targets are few)."""
        import faiss

        from laion_tasks.stages.dedup import _normalise

        if targets.shape[1] != self.centroids.leaves.shape[1]:
            raise StageError(f"target embeddings have {targets.shape[1]} dimensions, the pool's {self.centroids.leaves.shape[1]}")
        _, ids = faiss.knn(_normalise(targets - self.centroids.mean), self.centroids.leaves, 1, metric=faiss.METRIC_INNER_PRODUCT)
        return ids[:, 0].astype(np.int64)

    @abc.abstractmethod
    def keep_sql(self, db: SnapshotDB, hits: np.ndarray) -> str:
        """SQL true for scan rows in a hit cluster (registers the members it reads in ``db``)."""


class DedupPool(_Pool):
    """Dedup's centroids and its per-vector nearest cluster (``runs/*.primary.npy``), joined on dedup's rank."""

    source = "dedup"

    def __init__(self, centroids: Any, runs: list[str], vectors: int) -> None:
        super().__init__(centroids)
        self.runs, self.vectors = runs, vectors

    def members(self, hits: np.ndarray) -> np.ndarray:
        """Dedup ranks of the pool vectors whose nearest cluster is in ``hits``."""
        out = []
        for prefix in self.runs:
            with storage.local_copy(f"{prefix}.primary.npy") as p, storage.local_copy(f"{prefix}.rank.npy") as r:
                primary, rank = np.load(p, mmap_mode="r"), np.load(r, mmap_mode="r")
                out.append(np.asarray(rank[np.isin(primary, hits)], dtype=np.int64))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def keep_sql(self, db: SnapshotDB, hits: np.ndarray) -> str:
        db.con.register(_MEMBERS, pa.table({"rank": self.members(hits)}))
        return f"_rank IN (SELECT rank FROM {_MEMBERS})"


class OwnPool(_Pool):
    """Centroids the rule trained, and every pool embedding's cluster (assigned once per process and run)."""

    source = "rule"

    def __init__(self, centroids: Any, shards: list[tuple[str, str, str]]) -> None:
        super().__init__(centroids)
        self.shards = shards
        self.assigned: list[np.ndarray] = [assign_shard(clip, emb, centroids) for _, clip, emb in shards]
        self.vectors = int(sum(int((a >= 0).sum()) for a in self.assigned))

    def keep_sql(self, db: SnapshotDB, hits: np.ndarray) -> str:
        from laion_tasks.stage import read_parquet

        ids = []
        for (shard, clip_uri, _), clusters in zip(self.shards, self.assigned):
            keys = read_parquet(clip_uri, "clip parquet", ["key"]).column(0).cast(pa.string())
            picked = keys.filter(pa.array(np.isin(clusters, hits)))
            ids.append(pc.binary_join_element_wise(pa.scalar(shard), picked, "/"))
        column = pa.chunked_array([c for a in ids for c in a.chunks], pa.string()) if ids else pa.chunked_array([], pa.string())
        db.con.register(_MEMBERS, pa.table({"id": column}))
        return f"_shard || '/' || key IN (SELECT id FROM {_MEMBERS})"


def assign_shard(clip_uri: str, emb_uri: str, centroids: Any, chunk: int = 65_536) -> np.ndarray:
    """Each clip row's nearest cluster through the centroid tree (-1 without an embedding)."""
    from laion_tasks.stages.dedup import _embedding_rows, _has_embedding, _normalise

    has = _has_embedding(clip_uri)
    out = np.full(len(has), -1, dtype=np.int32)
    with storage.local_copy(emb_uri) as path:
        emb = np.load(path, mmap_mode="r")
        rows = _embedding_rows(has, emb.shape[0], emb_uri)
        with_vec = np.flatnonzero(rows >= 0)
        for start in range(0, len(with_vec), chunk):
            sel = with_vec[start : start + chunk]
            out[sel] = centroids.assign(_normalise(emb[rows[sel]]), 1)[:, 0]
    return out


class _PoolCache:
    """One clustering per wanted cluster size per scan: subsets that want the same size share it."""

    def __init__(self, db: SnapshotDB, config: CurateConfig) -> None:
        self.db, self.config = db, config
        self.pools: dict[int, _Pool] = {}

    def get(self, cluster_size: int, has_ranks: bool) -> _Pool:
        if cluster_size not in self.pools:
            self.pools[cluster_size] = (has_ranks and dedup_pool(self.db, cluster_size)) or own_pool(self.db, cluster_size, self.config)
        return self.pools[cluster_size]


def dedup_pool(db: SnapshotDB, cluster_size: int) -> DedupPool | None:
    """Dedup's clustering when it exists and its clusters hold about ``cluster_size`` embeddings, else None."""
    from laion_tasks.stages.dedup import Centroids, centroids_uri, list_runs, work_dir_for

    work = work_dir_for(db.root, db.snapshot)
    uri = centroids_uri(work)
    runs = list_runs(work)
    if not storage.exists(uri) or not runs or not all(storage.exists(f"{r}.primary.npy") for r in runs):
        return None
    centroids = Centroids.load(uri)
    vectors = 0
    for prefix in runs:
        with storage.local_copy(f"{prefix}.primary.npy") as path:
            vectors += int(np.load(path, mmap_mode="r").shape[0])
    size = vectors / max(1, centroids.n_leaves)
    if not cluster_size / REUSE_FACTOR <= size <= cluster_size * REUSE_FACTOR:
        log.info("dedup's %d clusters hold %.0f embeddings each; the image rule wants %d: clustering anew",
                 centroids.n_leaves, size, cluster_size)
        return None
    return DedupPool(centroids, runs, vectors)


def pool_shards(db: SnapshotDB) -> list[tuple[str, str, str]]:
    """(shard, clip parquet, image embeddings) of every clip shard with embeddings."""
    base = table_dir(db.root, db.snapshot, "clip").rstrip("/") + "/"
    out = []
    for uri in storage.list_uris(base, ".parquet"):
        rel = uri[len(base) :]
        shard = rel[: -len(".parquet")]
        emb = layout.clip_image_emb_uri(db.root, db.snapshot, shard)
        if "/" not in rel and storage.exists(emb):  # the table is flat; sub-folders are work files
            out.append((shard, uri, emb))
    return out


def own_pool(db: SnapshotDB, cluster_size: int, config: CurateConfig) -> OwnPool:
    """Dedup's two-level k-means with ``embeddings / cluster_size`` leaves, trained on a sample of the pool."""
    from laion_tasks.stages.dedup import Centroids, ShardInput, dedup_centroids

    shards = pool_shards(db)
    if not shards:
        raise StageError(f"image rule: no clip shard of {db.snapshot} has image embeddings")
    settings = DedupConfig(cluster_size=cluster_size, near_dup_probes=1, memory_limit=config.duckdb_memory_limit)
    uri = str(db.work_dir / f"rule-centroids-{cluster_size}.npz")
    dedup_centroids([ShardInput(s, "", clip, emb) for s, clip, emb in shards], uri, settings)
    return OwnPool(Centroids.load(uri), shards)


def _image_rule(db: SnapshotDB, table: str, flag: str, subset: SubsetConfig, pools: _PoolCache) -> tuple[int, dict[str, Any]]:
    assert subset.image_targets is not None
    clip = db.clip or ClipConfig()
    targets, how = target_embeddings(subset.image_targets, clip)
    has_ranks = bool(db.con.execute(f"SELECT count(_rank) > 0 FROM {table}").fetchall()[0][0])
    pool = pools.get(subset.image_cluster_size, has_ranks)
    hits = np.unique(pool.nearest(targets))
    try:
        dropped = _narrow(db, table, flag, pool.keep_sql(db, hits))
    finally:
        with contextlib.suppress(Exception):
            db.con.unregister(_MEMBERS)
    return dropped, {
        "targets": subset.image_targets,
        "target_embeddings": int(targets.shape[0]),
        "target_source": how,
        "clusters": pool.clusters,
        "clusters_hit": int(hits.size),
        "pool_embeddings": pool.vectors,
        "embeddings_per_cluster": round(pool.vectors / max(1, pool.clusters), 1),
        "centroids": "dedup's, reused" if pool.source == "dedup" else "trained by the rule (dedup's k-means)",
    }
