"""DAGs that consume curated subsets, scheduled on their Airflow Assets.

* ``laion_index_<crawl>``: builds the kNN search index of each subset in ``index.subsets``.
* ``laion_train_eval_<crawl>``: trains CLIP with open_clip's trainer on ``train.subset`` and
  each of ``train.compare_subsets`` (same settings, ``train.samples_seen`` each), evaluates
  every model zero-shot (CLIP_benchmark protocol) on ``eval.dataset``, and posts the metrics,
  and with compared subsets one table of them, into the dataset card. With
  ``clip.execution: kubernetes`` training runs as GPU pods (torchrun on ``train.gpus`` GPUs),
  one per subset; otherwise in-process.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, task

from laion_common.graph import run_settings, subset_asset, task_defaults
from laion_tasks.config import load_settings
from laion_tasks.stages.train import trained_subsets

SETTINGS = load_settings()
START = pendulum.datetime(2024, 1, 1, tz="UTC")


@task
def build_index(snapshot: str, subset: str) -> dict[str, Any]:
    from laion_tasks import runner

    settings, params = run_settings()
    return runner.run(settings, snapshot, "index", {"shards": [subset]}, force=bool(params.get("force", False)))


@task
def train(snapshot: str) -> str | None:
    from laion_tasks import runner

    settings, params = run_settings()
    return runner.run(settings, snapshot, "train", force=bool(params.get("force", False)))["checkpoint"]


@task
def checkpoint_uri(snapshot: str) -> str:
    """Where the training pod wrote its checkpoint (the pod reports through storage and lineage, not XCom)."""
    from laion_tasks import layout

    settings, _ = run_settings()
    return layout.checkpoint_uri(layout.model_dir(settings.storage.root, snapshot, settings.train.subset))


@task
def evaluate(snapshot: str, checkpoint: str | None) -> dict[str, Any]:
    from laion_tasks import runner

    settings, params = run_settings()
    if not checkpoint:
        raise ValueError(f"no checkpoint was produced for {settings.train.subset} in {snapshot}")
    return runner.run(settings, snapshot, "eval", force=bool(params.get("force", False)))


@task
def post_to_card(snapshot: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    from laion_tasks.card import post_eval_to_card

    settings, _ = run_settings()
    posted = post_eval_to_card(settings, snapshot, settings.train.subset, evaluation)
    if settings.train.compare_subsets:
        from laion_tasks.card import post_comparison_to_card

        posted["comparison"] = post_comparison_to_card(settings, snapshot)["rows"]
    return posted


def _safe(snapshot: str) -> str:
    return snapshot.replace("-", "_")


def make_index_dag(snapshot: str):  # type: ignore[no-untyped-def]
    assets = [subset_asset(snapshot, s) for s in SETTINGS.index.subsets]

    @dag(
        dag_id=f"laion_index_{_safe(snapshot)}",
        description=f"kNN index of {snapshot}'s subsets",
        schedule=assets,
        start_date=START,
        catchup=False,
        default_args=task_defaults(SETTINGS),
        tags=["laion", "index"],
        doc_md=__doc__,
    )
    def index_dag() -> None:
        for subset in SETTINGS.index.subsets:
            build_index.override(task_id=f"index_{subset.replace('.', '_')}")(snapshot, subset)

    return index_dag()


def make_train_eval_dag(snapshot: str):  # type: ignore[no-untyped-def]
    @dag(
        dag_id=f"laion_train_eval_{_safe(snapshot)}",
        description=f"Train CLIP on {snapshot}/{', '.join(trained_subsets(SETTINGS.train))}, evaluate zero-shot, "
        "post to the card",
        schedule=[subset_asset(snapshot, s) for s in trained_subsets(SETTINGS.train)],
        start_date=START,
        catchup=False,
        max_active_runs=1,
        default_args={**task_defaults(SETTINGS), "retries": 1},
        tags=["laion", "train", "eval"],
        doc_md=__doc__,
    )
    def train_eval_dag() -> None:
        if SETTINGS.clip.execution == "kubernetes":
            from laion_common.train_pod import train_pod_operator

            pods = [
                train_pod_operator("train" if s == SETTINGS.train.subset else f"train_{s.replace('.', '_')}", SETTINGS,
                                   snapshot, s, pool=SETTINGS.pods.train.pool)
                for s in trained_subsets(SETTINGS.train)
            ]
            checkpoint = checkpoint_uri(snapshot)
            pods >> checkpoint
        else:
            checkpoint = train(snapshot)
        post_to_card(snapshot, evaluate(snapshot, checkpoint))

    return train_eval_dag()


for _snapshot in SETTINGS.orchestration.snapshots:
    globals()[f"laion_index_{_safe(_snapshot)}"] = make_index_dag(_snapshot)
    globals()[f"laion_train_eval_{_safe(_snapshot)}"] = make_train_eval_dag(_snapshot)
