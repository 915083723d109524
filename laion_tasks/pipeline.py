"""Snapshot-level drivers: batches of shards in, lineage-recorded stage calls out.

The DAG tasks and ``laion run`` call these. Each driver takes the effective settings,
a snapshot id and a *batch descriptor* (a small dict of ids and URIs; never data), and
loops over its shards, wrapping every stage call in :func:`lineage.run_stage` so that
finished shards are skipped on re-runs and every outcome is counted.

A batch keeps going past a shard that fails, then raises one error naming every
failed shard, so a retry only redoes those (the rest are recorded done).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TypeVar

from laion_tasks import layout, storage
from laion_tasks.config import Settings
from laion_tasks.lineage import Lineage, StageRun, run_stage
from laion_tasks.stage import ShardStats, StageError

log = logging.getLogger(__name__)

Batch = dict[str, Any]
T = TypeVar("T")


class BatchError(StageError):
    """Some shards of a batch failed; the others are recorded done."""


def make_batches(items: Sequence[T], max_batches: int) -> list[list[T]]:
    """Split items into at most ``max_batches`` contiguous, near-equal batches (stable order)."""
    if not items:
        return []
    size = math.ceil(len(items) / max(1, max_batches))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def open_lineage(settings: Settings, snapshot: str) -> Lineage:
    storage.configure(settings.storage)
    lineage = Lineage(settings.lineage.url)
    lineage.ensure_snapshot(snapshot, layout.snapshot_root(settings.storage.root, snapshot), settings.digest())
    return lineage


@dataclass
class BatchResult:
    counts: Counter[str] = field(default_factory=Counter)
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "done": self.done, "skipped": self.skipped, "failed": self.failed}


def run_shards(
    lineage: Lineage,
    snapshot: str,
    stage: str,
    digest: str,
    jobs: Iterable[tuple[str, str, Callable[[], ShardStats]]],
    *,
    force: bool = False,
) -> BatchResult:
    """Run ``(shard_id, input_uri, fn)`` jobs with lineage; raise BatchError listing failures at the end."""
    result = BatchResult()
    errors: list[str] = []
    for shard_id, input_uri, fn in jobs:
        try:
            stats, skipped = run_stage(
                lineage, StageRun(snapshot, stage, shard_id, input_uri, digest), fn, force=force, output_exists=storage.exists
            )
        except Exception as exc:  # noqa: BLE001 - recorded in lineage, reported below
            log.error("%s failed on shard %s (%s): %s", stage, shard_id, input_uri, exc)
            result.failed.append(shard_id)
            errors.append(f"{shard_id} ({input_uri}): {type(exc).__name__}: {exc}")
            continue
        if skipped:
            result.skipped += 1
            log.info("%s: shard %s already done with config %s, skipped", stage, shard_id, digest)
        else:
            assert stats is not None
            result.done += 1
            result.counts.update(stats.counts)
            log.info("%s: shard %s done: %s", stage, shard_id, dict(stats.counts))
    if errors:
        raise BatchError(f"{stage}: {len(errors)} shard(s) failed (others recorded done):\n" + "\n".join(errors))
    return result


# -- extract -------------------------------------------------------------------


def wat_manifest_uri(settings: Settings, snapshot: str) -> str:
    return storage.join(settings.storage.root, snapshot, "manifests", "wat_files.txt")


def plan_extract(settings: Settings, snapshot: str, paths_uri: str | None = None) -> list[Batch]:
    """List the crawl's WAT files into a manifest and return batch descriptors over it."""
    from laion_tasks.stages.extract import list_wat_files

    wats = list_wat_files(snapshot, settings.extract, paths_uri=paths_uri)
    manifest = wat_manifest_uri(settings, snapshot)
    storage.write_text(manifest, "".join(f"{w}\n" for w in wats))
    batches = make_batches(range(len(wats)), settings.orchestration.max_mapped_tasks)
    return [{"manifest": manifest, "start": b[0], "stop": b[-1] + 1} for b in batches]


def extract_batch(settings: Settings, snapshot: str, batch: Batch, *, force: bool = False) -> dict[str, Any]:
    from laion_tasks.stages.extract import extract_wat

    lineage = open_lineage(settings, snapshot)
    wats = storage.read_text(batch["manifest"]).splitlines()[batch["start"] : batch["stop"]]
    root = settings.storage.root

    def jobs() -> Iterable[tuple[str, str, Callable[[], ShardStats]]]:
        for wat in wats:
            wat_id = layout.wat_id(wat)
            out = layout.candidates_uri(root, snapshot, wat_id)
            yield wat_id, wat, (lambda wat=wat, out=out: extract_wat(wat, out, settings.extract))

    return run_shards(lineage, snapshot, "extract", settings.digest("extract"), jobs(), force=force).to_dict()


# -- download ------------------------------------------------------------------


def per_shard_jobs(
    batch: Batch, input_uri: Callable[[str], str], call: Callable[[str], ShardStats]
) -> Iterable[tuple[str, str, Callable[[], ShardStats]]]:
    """``(shard_id, input_uri, fn)`` jobs for a batch of download shards."""
    for shard in batch["shards"]:
        yield shard, input_uri(shard), (lambda shard=shard: call(shard))


def _shard_ids(shard_uris: list[str]) -> list[str]:
    """``.../shards/000123.parquet`` -> ``000123``."""
    return [uri.rsplit("/", 1)[-1].removesuffix(".parquet") for uri in shard_uris]


def plan_download(settings: Settings, snapshot: str) -> list[Batch]:
    """Regroup all candidate shards into fixed-size download shards; return batches of shard ids."""
    from laion_tasks.stages.regroup import make_download_shards

    root = settings.storage.root
    candidates = storage.list_uris(layout.candidates_dir(root, snapshot), ".parquet")
    shard_uris = make_download_shards(candidates, layout.shards_dir(root, snapshot), settings.download.shard_size)
    return [{"shards": b} for b in make_batches(_shard_ids(shard_uris), settings.orchestration.max_mapped_tasks)]


def download_batch(settings: Settings, snapshot: str, batch: Batch, *, force: bool = False, retry_failed: bool = False) -> dict[str, Any]:
    from laion_tasks.hashlists import HashLists
    from laion_tasks.stages import download as dl

    lineage = open_lineage(settings, snapshot)
    root = settings.storage.root
    blocklist = HashLists.from_config(settings.tag)
    fn = dl.retry_failed if retry_failed else dl.download_shard

    def call(shard: str) -> ShardStats:
        return fn(
            layout.shard_input_uri(root, snapshot, shard),
            layout.images_tar_uri(root, snapshot, shard),
            layout.images_parquet_uri(root, snapshot, shard),
            settings.download,
            blocklist,
        )

    jobs = per_shard_jobs(batch, lambda shard: layout.shard_input_uri(root, snapshot, shard), call)
    digest = settings.digest("download", "tag") + ("-retry" if retry_failed else "")
    return run_shards(lineage, snapshot, "download", digest, jobs, force=force or retry_failed).to_dict()


# -- clip ----------------------------------------------------------------------


def clip_shard_call(settings: Settings, snapshot: str) -> Callable[[str], ShardStats]:
    """Shard id -> the CLIP stage on that shard's layout URIs (shared by the DAG driver and the pod CLI)."""
    from laion_tasks.stages.clip_score import clip_score_shard

    root = settings.storage.root

    def call(shard: str) -> ShardStats:
        return clip_score_shard(
            layout.images_parquet_uri(root, snapshot, shard),
            layout.images_tar_uri(root, snapshot, shard),
            layout.clip_parquet_uri(root, snapshot, shard),
            layout.clip_image_emb_uri(root, snapshot, shard),
            layout.clip_text_emb_uri(root, snapshot, shard),
            settings.clip,
            language_threshold=settings.tag.language_threshold,
            langid_model_path=settings.tag.langid_model_path,
        )

    return call


def clip_batch(settings: Settings, snapshot: str, batch: Batch, *, force: bool = False) -> dict[str, Any]:
    from laion_tasks.stages.clip_score import clip_config_digest

    lineage = open_lineage(settings, snapshot)
    root = settings.storage.root
    jobs = per_shard_jobs(batch, lambda shard: layout.images_parquet_uri(root, snapshot, shard), clip_shard_call(settings, snapshot))
    return run_shards(lineage, snapshot, "clip", clip_config_digest(settings), jobs, force=force).to_dict()


# -- tag -----------------------------------------------------------------------


def tag_batch(settings: Settings, snapshot: str, batch: Batch, *, force: bool = False) -> dict[str, Any]:
    from laion_tasks.hashlists import HashLists
    from laion_tasks.stages.tag import tag_shard

    lineage = open_lineage(settings, snapshot)
    root = settings.storage.root
    hashlists = HashLists.from_config(settings.tag)  # once per batch, not per shard

    def call(shard: str) -> ShardStats:
        return tag_shard(
            layout.images_parquet_uri(root, snapshot, shard),
            layout.images_tar_uri(root, snapshot, shard),
            layout.clip_parquet_uri(root, snapshot, shard),
            layout.clip_image_emb_uri(root, snapshot, shard),
            layout.tags_parquet_uri(root, snapshot, shard),
            settings.tag,
            settings.clip,
            hashlists,
        )

    jobs = per_shard_jobs(batch, lambda shard: layout.images_parquet_uri(root, snapshot, shard), call)
    return run_shards(lineage, snapshot, "tag", settings.digest("tag", "clip"), jobs, force=force).to_dict()


# -- curate and card -------------------------------------------------------------


def curate_all(settings: Settings, snapshot: str, *, force: bool = True) -> dict[str, Any]:
    """Write every configured subset from one scan; lineage records one ``curate`` shard per subset.

    Forced by default: upstream shards may have changed under the same config.
    """
    from laion_tasks.stages.curate import CURATE_DIGEST_SECTIONS, curate_with_lineage

    lineage = open_lineage(settings, snapshot)
    names = list(settings.curate.subsets)
    results = curate_with_lineage(
        lineage, settings.storage.root, snapshot, names, settings.curate, settings.clip,
        settings.digest(*CURATE_DIGEST_SECTIONS), force=force,
    )
    return {
        name: {"skipped": skipped, "counts": dict(stats.counts) if stats else {}, **(stats.extra if stats else {})}
        for name, (stats, skipped) in results.items()
    }


def write_card(settings: Settings, snapshot: str) -> dict[str, Any]:
    from laion_tasks.card import write_dataset_card

    lineage = open_lineage(settings, snapshot)
    uri = write_dataset_card(settings.storage.root, snapshot, lineage, config=settings.curate, clip=settings.clip)
    return {"card": uri}


# -- dedup ---------------------------------------------------------------------
# Four steps, so that no task holds the snapshot in memory: centroids (one task, a
# sample) -> partition (one run per download batch: ranks, digests, vectors sorted by
# k-means cluster) -> near (mapped over buckets of clusters) -> resolve (DuckDB: exact
# groups, pointers to final representatives, written per shard under dedup/).


def dedup_work_dir(settings: Settings, snapshot: str) -> str:
    return storage.join(settings.storage.root, snapshot, "dedup_work")


def _all_shards(settings: Settings, snapshot: str) -> list[str]:
    return _shard_ids(storage.list_uris(layout.shards_dir(settings.storage.root, snapshot), ".parquet"))


DEDUP_DIGEST_SECTIONS = ("download", "clip", "tag", "dedup")


def _dedup_inputs(settings: Settings, snapshot: str, shards: Iterable[str]) -> list[Any]:
    from laion_tasks.stages.dedup import ShardInput

    root = settings.storage.root
    return [
        ShardInput(shard, layout.images_parquet_uri(root, snapshot, shard), layout.clip_parquet_uri(root, snapshot, shard),
                   layout.clip_image_emb_uri(root, snapshot, shard), layout.tags_parquet_uri(root, snapshot, shard))
        for shard in shards
    ]


def dedup_runs(settings: Settings, snapshot: str) -> dict[int, list[str]]:
    """Run index -> its shards: the download batches, numbered by their first shard's position
    (so ranks follow shard order). Only these runs are read, so files of an older plan are ignored."""
    shards = sorted(_all_shards(settings, snapshot))
    position = {s: i for i, s in enumerate(shards)}
    return {position[b[0]]: b for b in make_batches(shards, settings.orchestration.max_mapped_tasks)}


def _run_prefixes(settings: Settings, snapshot: str) -> list[str]:
    from laion_tasks.stages.dedup import run_prefix

    return [run_prefix(dedup_work_dir(settings, snapshot), run) for run in sorted(dedup_runs(settings, snapshot))]


def dedup_centroids_task(settings: Settings, snapshot: str, *, force: bool = False) -> dict[str, Any]:
    from laion_tasks.stages.dedup import centroids_uri, dedup_centroids

    if not settings.dedup.near_dup:
        return {"skipped": "dedup.near_dup is off"}
    lineage = open_lineage(settings, snapshot)
    root = settings.storage.root
    inputs = _dedup_inputs(settings, snapshot, _all_shards(settings, snapshot))
    out = centroids_uri(dedup_work_dir(settings, snapshot))
    jobs = [("centroids", layout.snapshot_root(root, snapshot), lambda: dedup_centroids(inputs, out, settings.dedup))]
    return run_shards(lineage, snapshot, "dedup_centroids", settings.digest(*DEDUP_DIGEST_SECTIONS), jobs, force=force).to_dict()


def dedup_partition_batch(settings: Settings, snapshot: str, batch: Batch, *, force: bool = False) -> dict[str, Any]:
    """One download batch is one dedup run (ranks, digests and clustered vectors of its shards)."""
    from laion_tasks.stages.dedup import centroids_uri, dedup_partition, run_name

    lineage = open_lineage(settings, snapshot)
    work = dedup_work_dir(settings, snapshot)
    runs = {tuple(shards): run for run, shards in dedup_runs(settings, snapshot).items()}
    run = runs.get(tuple(batch["shards"]))
    if run is None:
        raise StageError(f"dedup_partition: batch {batch['shards'][:3]}... is not a batch of the current download plan")
    centroids = centroids_uri(work) if settings.dedup.near_dup else None
    inputs = _dedup_inputs(settings, snapshot, batch["shards"])
    fn = lambda: dedup_partition(inputs, run, work, settings.dedup, settings.clip, centroids)  # noqa: E731
    jobs = [(run_name(run), layout.images_parquet_uri(settings.storage.root, snapshot, batch["shards"][0]), fn)]
    return run_shards(lineage, snapshot, "dedup_partition", settings.digest(*DEDUP_DIGEST_SECTIONS), jobs, force=force).to_dict()


def plan_dedup(settings: Settings, snapshot: str) -> list[Batch]:
    return [{"buckets": batch} for batch in make_batches(range(settings.dedup.buckets), settings.orchestration.max_mapped_tasks)]


def dedup_bucket_batch(settings: Settings, snapshot: str, batch: Batch, *, force: bool = False) -> dict[str, Any]:
    """Near-duplicate decisions for a batch of buckets (contiguous cluster ranges)."""
    from laion_tasks.stages.dedup import decision_uri, dedup_near

    if not settings.dedup.near_dup:
        return {"skipped": "dedup.near_dup is off"}
    lineage = open_lineage(settings, snapshot)
    work = dedup_work_dir(settings, snapshot)
    runs = _run_prefixes(settings, snapshot)

    def jobs() -> Iterable[tuple[str, str, Callable[[], ShardStats]]]:
        for bucket in batch["buckets"]:
            out = decision_uri(work, bucket)
            yield f"{bucket:05d}", work, (lambda bucket=bucket, out=out: dedup_near(bucket, work, out, settings.dedup, runs))

    # Runs are rewritten whenever partitions change, so buckets are always recomputed.
    return run_shards(lineage, snapshot, "dedup_bucket", settings.digest(*DEDUP_DIGEST_SECTIONS), jobs(), force=True).to_dict()


def dedup_resolve_task(settings: Settings, snapshot: str) -> dict[str, Any]:
    from laion_tasks.stages.dedup import decision_uri, dedup_resolve

    lineage = open_lineage(settings, snapshot)
    work = dedup_work_dir(settings, snapshot)
    out = layout.dedup_dir(settings.storage.root, snapshot)
    runs = _run_prefixes(settings, snapshot)
    decisions = [decision_uri(work, b) for b in range(settings.dedup.buckets)] if settings.dedup.near_dup else []
    jobs = [("resolve", work, lambda: dedup_resolve(work, out, settings.dedup, runs, decisions))]
    return run_shards(lineage, snapshot, "dedup", settings.digest(*DEDUP_DIGEST_SECTIONS), jobs, force=True).to_dict()


# -- train -> eval -------------------------------------------------------------------


def train_subset(settings: Settings, snapshot: str, subset: str | None = None, *, force: bool = False) -> dict[str, Any]:
    """Train CLIP with open_clip's trainer on a curated subset's WebDataset shards."""
    from laion_tasks.stages.train import subset_shards, train_clip

    lineage = open_lineage(settings, snapshot)
    root = settings.storage.root
    subset = subset or settings.train.subset
    subset_dir = layout.subset_dir(root, snapshot, subset)
    out = storage.join(layout.models_dir(root, snapshot), subset)
    checkpoint: dict[str, Any] = {}

    def fn() -> ShardStats:
        stats = train_clip(subset_shards(subset_dir), out, settings.train, run_name=f"{subset}-{settings.digest('train')[:8]}")
        checkpoint["uri"] = stats.output_uri
        return stats

    result = run_shards(lineage, snapshot, "train", settings.digest("train", "curate"), [(subset, subset_dir, fn)], force=force)
    if "uri" not in checkpoint:  # skipped: the recorded run's output
        record = lineage.done_record(snapshot, "train", subset, settings.digest("train", "curate"))
        checkpoint["uri"] = record["output_uri"] if record else None
    return {**result.to_dict(), "subset": subset, "checkpoint": checkpoint["uri"]}


def evaluate_checkpoint(settings: Settings, snapshot: str, subset: str, checkpoint: str, *, force: bool = False) -> dict[str, Any]:
    """Zero-shot classification (CLIP_benchmark protocol) of a trained checkpoint on ``eval.dataset``."""
    from laion_tasks.models.clip import load_clip
    from laion_tasks.stages.evaluate import evaluate_zeroshot

    if not settings.eval.dataset:
        return {"skipped": "eval.dataset is not set"}
    lineage = open_lineage(settings, snapshot)
    out = storage.join(layout.models_dir(settings.storage.root, snapshot), subset, "eval")
    metrics: dict[str, Any] = {}

    def fn() -> ShardStats:
        with storage.local_copy(checkpoint) as path:
            model = load_clip(settings.train.model, checkpoint=str(path), device=settings.eval.device)
        stats = evaluate_zeroshot(model, settings.eval.dataset or "", out, settings.eval, settings.eval.classnames, settings.eval.templates)
        metrics.update(stats.extra.get("metrics", {}))
        return stats

    result = run_shards(lineage, snapshot, "eval", settings.digest("eval", "train"), [(subset, checkpoint, fn)], force=force)
    if not metrics and storage.exists(storage.join(out, "zeroshot.json")):
        import json

        metrics.update(json.loads(storage.read_text(storage.join(out, "zeroshot.json"))).get("metrics", {}))
    return {**result.to_dict(), "subset": subset, "report": storage.join(out, "zeroshot.md"), "metrics": metrics}


def _metric(value: Any) -> str:
    if value is None:
        return "n/a (undefined for this eval set, e.g. top-5 with fewer than 5 classes)"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def post_eval_to_card(settings: Settings, snapshot: str, subset: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Append the zero-shot metrics of the model trained on a subset to the snapshot's and subset's cards."""
    metrics = evaluation.get("metrics") or {}
    if not metrics:
        return {"posted": False, "reason": evaluation.get("skipped", "no metrics")}
    lines = [
        "",
        f"## Zero-shot evaluation of CLIP trained on `{subset}`",
        "",
        f"Model `{settings.train.model}`, {settings.train.epochs} epoch(s); eval set `{settings.eval.dataset}`; "
        f"report: `{evaluation.get('report')}`.",
        "",
        "| metric | value |",
        "|---|---:|",
        *[f"| {k} | {_metric(v)} |" for k, v in sorted(metrics.items())],
        "",
    ]
    root = settings.storage.root
    targets = [
        storage.join(layout.card_dir(root, snapshot), "README.md"),
        storage.join(layout.subset_dir(root, snapshot, subset), "README.md"),
    ]
    marker = f"## Zero-shot evaluation of CLIP trained on `{subset}`"
    for uri in targets:
        if not storage.exists(uri):
            continue
        text = storage.read_text(uri)
        if marker in text:  # replace an earlier evaluation section
            head, _, rest = text.partition(marker)
            tail = rest.split("\n## ", 1)
            text = head.rstrip("\n") + ("\n\n## " + tail[1] if len(tail) > 1 else "\n")
        storage.write_text(uri, text.rstrip("\n") + "\n" + "\n".join(lines))
    return {"posted": True, "cards": targets, "metrics": metrics}


# -- index ---------------------------------------------------------------------


def index_subset(settings: Settings, snapshot: str, subset: str) -> dict[str, Any]:
    """Build the kNN index of a curated subset from the CLIP stage's fp16 embeddings."""
    from laion_tasks.stages.index import build_index

    lineage = open_lineage(settings, snapshot)
    root = settings.storage.root
    shards = _all_shards(settings, snapshot)
    embeddings = [layout.clip_image_emb_uri(root, snapshot, s) for s in shards]
    clips = [layout.clip_parquet_uri(root, snapshot, s) for s in shards]
    subset_parts = storage.list_uris(layout.subset_dir(root, snapshot, subset), ".parquet")
    out = layout.index_dir(root, snapshot, subset)
    fn = lambda: build_index(embeddings, clips, out, settings.index, subset_uris=subset_parts)  # noqa: E731
    # A subset is rewritten in place when re-curated, so its index is always rebuilt.
    result = run_shards(lineage, snapshot, "index", settings.digest("index", "curate"), [(subset, out, fn)], force=True)
    return {**result.to_dict(), "subset": subset, "index_dir": out}
