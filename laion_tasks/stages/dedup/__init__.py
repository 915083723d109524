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

import logging
import math

import pyarrow.parquet as pq

from laion_tasks import layout, storage
from laion_tasks.config import ClipConfig, DedupConfig
from laion_tasks.stage import Context, ShardStats, StageError, StageSpec
from laion_tasks.stages.dedup.centroids import Centroids, dedup_centroids, train_centroids
from laion_tasks.stages.dedup.common import (
    DECISION_SCHEMA,
    OUTPUT_SCHEMA,
    REASONS,
    ShardInput,
    _embedding_rows,
    _has_embedding,
    _normalise,
    centroids_uri,
    decision_uri,
    list_runs,
    pairs_uri,
    remove_stale_runs,
    run_prefix,
)
from laion_tasks.stages.dedup.near import dedup_near, near_duplicate_pointers, similar_pairs
from laion_tasks.stages.dedup.partition import dedup_partition
from laion_tasks.stages.dedup.resolve import dedup_resolve, resolve_verdicts

__all__ = [  # the steps and what tests, benchmarks and curate use, from the modules of each step
    "OUTPUT_SCHEMA", "REASONS", "SPECS", "Centroids", "ShardInput", "centroids_uri", "dedup_all", "dedup_centroids",
    "dedup_near", "dedup_partition", "dedup_resolve", "decision_uri", "list_runs", "make_runs", "near_duplicate_pointers",
    "pairs_uri", "resolve_verdicts", "similar_pairs", "train_centroids", "work_dir_for",
    "_embedding_rows", "_has_embedding", "_normalise",
]

log = logging.getLogger(__name__)


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
