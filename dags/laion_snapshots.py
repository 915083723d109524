"""One DAG per crawl snapshot listed in ``orchestration.snapshots``.

Triggered from the UI with a params form (storage root, max WAT files, ...). Re-runs
skip shards that lineage records done with the same config digest.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from laion_common.graph import build_snapshot_graph, snapshot_params, task_defaults
from laion_tasks.config import load_settings

SETTINGS = load_settings()


def dag_id_for(snapshot: str) -> str:
    return "laion_snapshot_" + snapshot.replace("-", "_")


def make_snapshot_dag(snapshot: str):  # type: ignore[no-untyped-def]
    @dag(
        dag_id=dag_id_for(snapshot),
        description=f"Build image-text pairs from Common Crawl {snapshot}",
        schedule=None,
        start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        params=snapshot_params(SETTINGS),
        default_args=task_defaults(SETTINGS),
        tags=["laion", "snapshot"],
        doc_md=__doc__,
    )
    def snapshot_dag() -> None:
        build_snapshot_graph(snapshot, SETTINGS, static_snapshot=snapshot)

    return snapshot_dag()


for _snapshot in SETTINGS.orchestration.snapshots:
    globals()[dag_id_for(_snapshot)] = make_snapshot_dag(_snapshot)
