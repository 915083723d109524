"""What the dedup steps share: the output schemas, rank layout, run and file names, and the embeddings of a shard."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import storage
from laion_tasks.stage import StageError

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
