"""The snapshot task graph, shared by the per-snapshot DAGs and the monthly ingest.

Tasks are thin: they rebuild the effective settings from config + the run's params and
call the generic runner (``laion_tasks.runner``) with a stage name and a batch; the task
id is the stage's name. XCom carries only batch descriptors (ranges into a plan).
Fan-out is bounded by ``orchestration.max_mapped_tasks``.
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
def plan(stage: str, snapshot: str) -> list[dict[str, Any]]:
    """Plan a stage through the runner; returns range batches (XCom carries no shard ids)."""
    from laion_tasks import runner

    settings, params = run_settings()
    ctx = runner.open_context(
        settings, snapshot, wat_paths_uri=params.get("wat_paths_uri"), retry_failed_downloads=bool(params.get("retry_failed_downloads"))
    )
    try:
        return runner.plan(ctx, stage)
    finally:
        ctx.close()


def stage_task(stage: str, **task_kwargs: Any):  # type: ignore[no-untyped-def]
    """The DAG task of a stage (task id = stage name): ``runner.run_batch`` on one batch."""

    @task(task_id=stage, **task_kwargs)
    def run_stage(snapshot: str, batch: dict[str, Any] | None = None) -> dict[str, Any]:
        from laion_tasks import runner

        settings, params = run_settings()
        return runner.run(
            settings,
            snapshot,
            stage,
            batch,
            force=bool(params.get("force", False)),
            retry_failed_downloads=bool(params.get("retry_failed_downloads", False)),
        )

    return run_stage


@task
def dataset_card(snapshot: str) -> dict[str, Any]:
    """The card is a view over lineage and the outputs, not a stage: written on every run."""
    from laion_tasks import runner
    from laion_tasks.card import write_dataset_card

    settings, _ = run_settings()
    ctx = runner.open_context(settings, snapshot)
    return {"card": write_dataset_card(settings.storage.root, snapshot, ctx.lineage, config=settings.curate, clip=settings.clip)}


@task
def verify(snapshot: str) -> dict[str, Any]:
    """The last task: `laion verify`. A problem fails the run, and lineage shows it as a failed ``verify`` run."""
    from laion_tasks import runner
    from laion_tasks.verify import verify_and_record

    settings, _ = run_settings()
    ctx = runner.open_context(settings, snapshot)
    try:
        problems = verify_and_record(settings, snapshot, ctx.lineage)  # type: ignore[arg-type]
    finally:
        ctx.close()
    if problems:
        raise RuntimeError(f"{snapshot}: {len(problems)} problem(s):\n" + "\n".join(p.line() for p in problems))
    return {"verified": True}


def build_snapshot_graph(snapshot: Any, settings: Settings, static_snapshot: str | None = None) -> None:
    """The snapshot DAG, built from the stage declarations (``StageSpec``) in pipeline order, then
    the dataset card and ``verify``. Adding a stage means writing its module; nothing here changes.

    - A stage that writes a plan, or the first mapped stage of a plan, gets a ``plan_<stage>`` task;
      every mapped stage on that plan expands over its batches (XCom carries ranges, not ids).
    - A stage with ``mapped=False`` is one task over all its shards (curate publishes each subset's Asset).
    - Edges come from ``reads`` and ``after``; ``pod_section`` in ``kubernetes`` mode makes it a GPU pod.
    - ``downstream`` stages (index, train, eval) run in the Asset-triggered DAGs.

    ``snapshot`` may be a string or an XComArg (the monthly DAG resolves it at run time). Subset
    Assets are only declared when the snapshot is known at parse time.
    """
    from laion_tasks import runner
    from laion_tasks.stage import STAGE_MODULES

    specs = []
    for name in STAGE_MODULES:  # pipeline order; the downstream stages come last (their modules import torch)
        stage = runner.spec(name)
        if stage.downstream:
            break
        specs.append(stage)
    tasks: dict[str, Any] = {}
    plans: dict[str, Any] = {}
    for stage in specs:
        upstream = [tasks[n] for n in (*stage.reads, *stage.after) if n in tasks]
        if not stage.mapped:
            published = stage.publishes(settings) if stage.publishes else []
            outlets = [subset_asset(static_snapshot, n) for n in published] if static_snapshot else []
            node = stage_task(stage.name, outlets=outlets)(snapshot)
        else:
            if stage.plan_name not in plans:
                plans[stage.plan_name] = plan.override(task_id=f"plan_{stage.name}")(stage.name, snapshot)
                for up in upstream:
                    up >> plans[stage.plan_name]
            batches = plans[stage.plan_name]
            pod = stage.pod_section and getattr(settings, stage.pod_section).execution == "kubernetes"
            if pod:
                from laion_common.gpu_pod import clip_pod_partial

                node = clip_pod_partial(stage.name, settings).expand(arguments=clip_pod_args(snapshot, batches))
            else:
                pool = {"pool": settings.orchestration.download_pool} if stage.name == "download" else {}
                node = stage_task(stage.name, **pool).partial(snapshot=snapshot).expand(batch=batches)
        for up in upstream:
            up >> node
        tasks[stage.name] = node
    card = dataset_card(snapshot)
    tasks[specs[-1].name] >> card >> verify(snapshot)


@task
def clip_pod_args(snapshot: str, plan: list[dict[str, Any]]) -> list[list[str]]:
    """One pod per download batch (``laion run clip --batch``); the pod reads and writes storage and
    lineage itself. The run's ``force`` Param becomes ``--force`` here (``storage_root`` travels in the pod env)."""
    from laion_common.gpu_pod import clip_pod_arguments, force_flag

    force = force_flag(dict(get_current_context()["params"]))
    return [clip_pod_arguments(snapshot, batch, force) for batch in plan]
