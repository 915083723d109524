"""The snapshot task graph, shared by the per-snapshot DAGs and the monthly ingest.

Tasks are thin: they rebuild the effective settings from config + the run's params
and call one ``laion_tasks.pipeline`` driver per batch. XCom carries only batch
descriptors (ids and URIs). Fan-out is bounded by ``orchestration.max_mapped_tasks``.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, Param, get_current_context, task

from laion_tasks.config import Settings, load_settings

log = logging.getLogger(__name__)


def subset_asset(snapshot: str, subset: str) -> Asset:
    """The Asset a curated subset publishes; index and train/eval DAGs schedule on it."""
    return Asset(name=f"laion/{snapshot}/subsets/{subset}", uri=f"laion://{snapshot}/subsets/{subset}", group="laion-subsets")


def snapshot_params(settings: Settings) -> dict[str, Param]:
    return {
        "storage_root": Param(settings.storage.root, type="string", description="Local path or s3:// root for outputs."),
        "max_wat_files": Param(
            settings.extract.max_wat_files, type=["null", "integer"], minimum=1, description="Take only the first N WAT files."
        ),
        "sample_wat_files": Param(
            settings.extract.sample_wat_files, type=["null", "integer"], minimum=1, description="Deterministic sample of N WAT files."
        ),
        "wat_paths_uri": Param(
            None, type=["null", "string"], description="Override the crawl's wat.paths.gz (e.g. a local fixture crawl)."
        ),
        "force": Param(False, type="boolean", description="Re-run shards even if lineage says they are done."),
        "retry_failed_downloads": Param(
            False, type="boolean", description="Re-download only the failed samples of finished shards and merge them in."
        ),
    }


def run_settings() -> tuple[Settings, dict[str, Any]]:
    """Settings for this task run: config file + LAION_* env, then the run's params."""
    params = dict(get_current_context()["params"])
    overrides: dict[str, Any] = {"storage": {"root": params.get("storage_root")}} if params.get("storage_root") else {}
    extract: dict[str, Any] = {}
    if params.get("max_wat_files"):
        extract["max_wat_files"] = params["max_wat_files"]
    if params.get("sample_wat_files"):
        extract["sample_wat_files"] = params["sample_wat_files"]
    if extract:
        overrides["extract"] = extract
    return load_settings(overrides=overrides), params


def task_defaults(settings: Settings) -> dict[str, Any]:
    orch = settings.orchestration
    return {
        "retries": orch.task_retries,
        "retry_delay": timedelta(seconds=orch.retry_delay_s),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(seconds=orch.max_retry_delay_s),
        "execution_timeout": timedelta(seconds=orch.task_timeout_s),
    }


@task
def plan_extract(snapshot: str) -> list[dict[str, Any]]:
    from laion_tasks import pipeline

    settings, params = run_settings()
    return pipeline.plan_extract(settings, snapshot, paths_uri=params.get("wat_paths_uri"))


def batch_task(task_id: str, driver: str, **task_kwargs: Any):  # type: ignore[no-untyped-def]
    """A mapped task that runs ``pipeline.<driver>(settings, snapshot, batch, force=...)`` on one batch."""

    @task(task_id=task_id, **task_kwargs)
    def run_batch(snapshot: str, batch: dict[str, Any]) -> dict[str, Any]:
        from laion_tasks import pipeline

        settings, params = run_settings()
        return getattr(pipeline, driver)(settings, snapshot, batch, force=params.get("force", False))

    return run_batch


extract = batch_task(
    "extract", "extract_batch", map_index_template="{{ task.op_kwargs['batch']['start'] }}-{{ task.op_kwargs['batch']['stop'] }}"
)
clip_score = batch_task("clip_score", "clip_batch")
tag = batch_task("tag", "tag_batch")
dedup_partition = batch_task("dedup_partition", "dedup_partition_batch")
dedup_buckets = batch_task("dedup_buckets", "dedup_bucket_batch")


@task
def plan_download(snapshot: str) -> list[dict[str, Any]]:
    from laion_tasks import pipeline

    settings, _ = run_settings()
    return pipeline.plan_download(settings, snapshot)


@task
def download(snapshot: str, batch: dict[str, Any]) -> dict[str, Any]:
    from laion_tasks import pipeline

    settings, params = run_settings()
    return pipeline.download_batch(
        settings, snapshot, batch, force=params.get("force", False), retry_failed=params.get("retry_failed_downloads", False)
    )


@task
def dedup_centroids(snapshot: str) -> dict[str, Any]:
    from laion_tasks import pipeline

    settings, params = run_settings()
    return pipeline.dedup_centroids_task(settings, snapshot, force=params.get("force", False))


@task
def plan_dedup(snapshot: str) -> list[dict[str, Any]]:
    from laion_tasks import pipeline

    settings, _ = run_settings()
    return pipeline.plan_dedup(settings, snapshot)


@task
def dedup_resolve(snapshot: str) -> dict[str, Any]:
    from laion_tasks import pipeline

    settings, _ = run_settings()
    return pipeline.dedup_resolve_task(settings, snapshot)


@task(task_id="curate_subsets")
def curate(snapshot: str) -> dict[str, Any]:
    """Every subset from one scan of the snapshot; each subset's Asset is an outlet of this task."""
    from laion_tasks import pipeline

    settings, _ = run_settings()
    return pipeline.curate_all(settings, snapshot)


@task
def dataset_card(snapshot: str) -> dict[str, Any]:
    from laion_tasks import pipeline

    settings, _ = run_settings()
    return pipeline.write_card(settings, snapshot)


def build_snapshot_graph(snapshot: Any, settings: Settings, static_snapshot: str | None = None) -> None:
    """Wire extract -> download -> clip -> tag -> dedup -> curate -> card for one snapshot.

    ``snapshot`` may be a string or an XComArg (the monthly DAG resolves it at run time).
    Subset Assets are only declared when the snapshot is known at parse time.
    """
    gpu_kwargs: dict[str, Any] = {"pool": settings.clip.gpu_pool} if settings.clip.execution == "kubernetes" else {}
    extract_plan = plan_extract(snapshot)
    extracted = extract.partial(snapshot=snapshot).expand(batch=extract_plan)
    download_plan = plan_download(snapshot)
    extracted >> download_plan
    downloaded = download.override(pool=settings.orchestration.download_pool).partial(snapshot=snapshot).expand(batch=download_plan)
    if settings.clip.execution == "kubernetes":
        from laion_common.gpu_pod import clip_pod_partial

        scored = clip_pod_partial("clip_score", settings).expand(arguments=clip_pod_args(snapshot, download_plan))
    else:
        scored = clip_score.override(**gpu_kwargs).partial(snapshot=snapshot).expand(batch=download_plan)
    downloaded >> scored
    tagged = tag.partial(snapshot=snapshot).expand(batch=download_plan)
    scored >> tagged
    centroids = dedup_centroids(snapshot)
    tagged >> centroids
    partitioned = dedup_partition.partial(snapshot=snapshot).expand(batch=download_plan)
    centroids >> partitioned
    bucket_plan = plan_dedup(snapshot)
    partitioned >> bucket_plan
    bucketed = dedup_buckets.partial(snapshot=snapshot).expand(batch=bucket_plan)
    deduped = dedup_resolve(snapshot)
    bucketed >> deduped
    card = dataset_card(snapshot)
    outlets = [subset_asset(static_snapshot, name) for name in settings.curate.subsets] if static_snapshot else []
    curated = curate.override(outlets=outlets)(snapshot)
    deduped >> curated >> card


@task
def clip_pod_args(snapshot: str, plan: list[dict[str, Any]]) -> list[list[str]]:
    """One pod per download batch; the pod reads and writes storage and lineage itself."""
    from laion_common.gpu_pod import clip_pod_arguments

    return [clip_pod_arguments(snapshot, ",".join(batch["shards"])) for batch in plan]
