"""DAG files import cleanly and have the promised shape (no scheduler needed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("airflow-home")
    cfg = home / "laion.yaml"
    cfg.write_text(
        "orchestration:\n  snapshots: [CC-MAIN-2024-10, CC-MAIN-2024-18]\n  max_mapped_tasks: 200\n"
    )
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["LAION_CONFIG"] = str(cfg)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    sys.path.insert(0, str(REPO / "dags"))
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    yield bag
    os.environ.pop("LAION_CONFIG", None)


def test_no_import_errors(dagbag) -> None:  # type: ignore[no-untyped-def]
    assert dagbag.import_errors == {}


def test_one_dag_per_snapshot_and_monthly(dagbag) -> None:  # type: ignore[no-untyped-def]
    ids = set(dagbag.dag_ids)
    assert {"laion_snapshot_CC_MAIN_2024_10", "laion_snapshot_CC_MAIN_2024_18", "laion_monthly_ingest"} <= ids


def test_snapshot_dag_shape(dagbag) -> None:  # type: ignore[no-untyped-def]
    dag = dagbag.dags["laion_snapshot_CC_MAIN_2024_10"]
    tasks = {t.task_id: t for t in dag.tasks}
    for name in ("plan_extract", "extract", "plan_download", "download", "clip", "tag", "dedup_centroids",
                 "dedup_partition", "plan_dedup_bucket", "dedup_bucket", "dedup", "dataset_card"):
        assert name in tasks, name
    assert tasks["dataset_card"].downstream_task_ids == {"verify"} and not tasks["verify"].downstream_task_ids
    assert tasks["download"].pool == "download"
    assert tasks["extract"].retries == 3 and tasks["extract"].retry_exponential_backoff
    assert tasks["extract"].execution_timeout is not None
    assert {"storage_root", "max_wat_files", "force", "retry_failed_downloads"} <= set(dag.params.keys())
    assert tasks["plan_extract"].downstream_task_ids == {"extract"}
    curate_tasks = [t for t in dag.tasks if t.task_id == "curate"]
    assert curate_tasks and all(t.outlets for t in curate_tasks)
    uris = {o.uri for t in curate_tasks for o in t.outlets}
    assert "laion://CC-MAIN-2024-10/subsets/laion2B-en" in uris


def test_monthly_is_scheduled(dagbag) -> None:  # type: ignore[no-untyped-def]
    dag = dagbag.dags["laion_monthly_ingest"]
    assert "resolve_crawl" in dag.task_ids
    assert dag.timetable.expression == "0 0 1 * *"


def test_fan_out_is_batched() -> None:
    from laion_tasks.runner import make_batches

    wats = [f"w{i}" for i in range(90_000)]
    batches = make_batches(wats, 200)
    assert len(batches) <= 200
    assert [w for b in batches for w in b] == wats


def test_newest_crawl_before() -> None:
    import datetime as dt

    from laion_tasks.crawls import newest_crawl_before

    collinfo = [
        {"id": "CC-MAIN-2024-18", "from": "2024-04-12T00:00:00", "to": "2024-04-25T00:00:00"},
        {"id": "CC-MAIN-2024-10", "from": "2024-02-20T00:00:00", "to": "2024-03-05T00:00:00"},
        {"id": "CC-NEWS-2024-01", "from": "2024-01-01", "to": "2024-01-02"},
    ]
    assert newest_crawl_before(collinfo, dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)) == "CC-MAIN-2024-18"
    assert newest_crawl_before(collinfo, dt.datetime(2024, 4, 1, tzinfo=dt.timezone.utc)) == "CC-MAIN-2024-10"
    with pytest.raises(LookupError):
        newest_crawl_before(collinfo, dt.datetime(2023, 1, 1, tzinfo=dt.timezone.utc))


def test_downstream_dags_are_scheduled_on_subset_assets(dagbag) -> None:  # type: ignore[no-untyped-def]
    train_eval = dagbag.dags["laion_train_eval_CC_MAIN_2024_10"]
    assert {"train", "evaluate", "post_to_card"} <= set(train_eval.task_ids)
    assert "laion://CC-MAIN-2024-10/subsets/laion400m" in repr(train_eval.timetable.asset_condition)
    index = dagbag.dags["laion_index_CC_MAIN_2024_10"]
    assert "laion://CC-MAIN-2024-10/subsets/laion2B-en" in repr(index.timetable.asset_condition)


def test_kubernetes_clip_stage_maps_gpu_pods(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With clip.execution=kubernetes the CLIP stage is a mapped KubernetesPodOperator in the GPU pool."""
    from airflow.dag_processing.dagbag import DagBag

    cfg = tmp_path / "k8s.yaml"
    cfg.write_text("orchestration:\n  snapshots: [CC-MAIN-2024-10]\nclip:\n  execution: kubernetes\n")
    monkeypatch.setenv("LAION_CONFIG", str(cfg))
    for name in [m for m in sys.modules if m.startswith(("laion_snapshots", "laion_common"))]:
        monkeypatch.delitem(sys.modules, name)
    bag = DagBag(dag_folder=str(REPO / "dags" / "laion_snapshots.py"))
    assert bag.import_errors == {}
    dag = bag.dags["laion_snapshot_CC_MAIN_2024_10"]
    pod = dag.get_task("clip")
    assert type(pod).__name__ == "MappedOperator" and pod.operator_class.__name__ == "KubernetesPodOperator"
    assert pod.partial_kwargs["pool"] == "gpu"
    assert "clip_pod_args" in pod.upstream_task_ids and "download" in pod.upstream_task_ids
