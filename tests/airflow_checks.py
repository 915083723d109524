"""What the real-scheduler tests check after a snapshot run (tests/test_deployment.py, tests/test_airflow_browser.py).

Each real-scheduler test starts its own Airflow stack and runs the whole DAG, the costliest part of
``make test``; so the checks after the run are shared, and each stack is checked for everything
it can show: the LocalExecutor stack in the browser test (UI-form trigger, views, backfill), the
CeleryExecutor stack in the deployment test (REST trigger, S3).
"""

from __future__ import annotations

import time
from typing import Any

from laion_tasks.airflow_local import AirflowStack
from laion_tasks.config import Settings
from laion_tasks.lineage import Lineage
from tests.accounting import (
    assert_downstream_outputs,
    assert_snapshot_accounting,
    done_shard_records,
)

MONTHLY_DAG = "laion_monthly_ingest"
RUN_TIMEOUT_S = 900


def asset_dags(snapshot: str) -> tuple[str, str]:
    """The DAGs the curate tasks' Asset events start: the kNN index, and train -> eval -> card."""
    safe = snapshot.replace("-", "_")
    return f"laion_index_{safe}", f"laion_train_eval_{safe}"


def failures(stack: AirflowStack, dag_id: str, runs: list[dict[str, Any]]) -> str:
    return "\n".join(stack.failure_report(dag_id, r["dag_run_id"]) for r in runs if r["state"] != "success")


def assert_asset_triggered_runs(stack: AirflowStack, snapshot: str, log: Any = print) -> None:
    """Each downstream DAG ran once, started by an Asset event (not by the test), and succeeded."""
    for dag_id in asset_dags(snapshot):
        runs = stack.wait_runs(dag_id, 1, RUN_TIMEOUT_S)
        assert [r["run_type"] for r in runs] == ["asset_triggered"], runs
        assert [r["state"] for r in runs] == ["success"], failures(stack, dag_id, runs)
        log(f"{dag_id} asset-triggered run succeeded")


def assert_after_snapshot_run(stack: AirflowStack, settings: Settings, lineage: Lineage, snapshot: str, log: Any = print) -> None:
    """The asset-triggered chain ran, and every candidate is accounted for once per stage and subset."""
    assert_asset_triggered_runs(stack, snapshot, log)
    assert_snapshot_accounting(settings, lineage, snapshot)  # after the asset DAGs: no stage still running
    assert_downstream_outputs(settings, lineage, snapshot)


def assert_monthly_backfill_skips_done_shards(stack: AirflowStack, settings: Settings, lineage: Lineage, snapshot: str,
                                              log: Any = print) -> None:
    """``airflow backfill create`` of the monthly ingest over two months: both runs succeed, and each month
    resolves the fixture crawl (released 2000-01-10) and skips its done shards."""
    done_before = done_shard_records(lineage, snapshot)
    # Unpause first: a paused DAG's backfill runs stay queued. Unpausing starts the latest month's run
    # (catchup=False); wait for it, because backfill runs are not counted against the DAG's
    # max_active_runs and every month here resolves to the same crawl.
    stack.unpause(MONTHLY_DAG)
    scheduled = stack.wait_runs(MONTHLY_DAG, 1, RUN_TIMEOUT_S)
    assert [(r["run_type"], r["state"]) for r in scheduled] == [("scheduled", "success")], failures(stack, MONTHLY_DAG, scheduled)
    log("latest month's scheduled run succeeded")
    started = time.monotonic()
    stack.cli("backfill", "create", "--dag-id", MONTHLY_DAG, "--from-date", "2000-02-01", "--to-date", "2000-03-31",
              "--max-active-runs", "1")
    runs = stack.wait_runs(MONTHLY_DAG, 3, RUN_TIMEOUT_S)
    log(f"monthly runs finished in {time.monotonic() - started:.0f}s: {[(r['run_type'], r['state']) for r in runs]}")
    backfills = [r for r in runs if r["run_type"] == "backfill"]
    assert sorted(r["logical_date"][:10] for r in backfills) == ["2000-02-01", "2000-03-01"], runs
    assert all(r["state"] == "success" for r in runs), failures(stack, MONTHLY_DAG, runs)
    assert done_shard_records(lineage, snapshot) == done_before
    assert_snapshot_accounting(settings, lineage, snapshot)
