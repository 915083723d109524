"""The product as a deployment runs it (issue #11): Airflow's api-server, scheduler,
dag-processor and triggerer started on loopback, PostgreSQL as the metadata and lineage
database, moto's S3 server for the data, the fixture crawl served over HTTP.

- The snapshot DAG is triggered through the REST API with a conf, as the UI's Trigger form posts it.
- The index and train -> eval DAGs must start from the curate tasks' Asset events.
- ``airflow backfill create`` of the monthly ingest over two months: both runs succeed.
- Every candidate is counted exactly once per stage and subset (tests/accounting.py).

LocalExecutor here; the CeleryExecutor variant (what docker-compose.yaml deploys) adds Redis
and ``airflow celery worker``. ``airflow dags test`` stays in test_e2e.py and test_dags.py,
where one process is the cheaper check.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from laion_tasks import demo, storage
from laion_tasks.airflow_local import AirflowStack, free_port
from laion_tasks.config import load_settings
from laion_tasks.lineage import Lineage
from tests.accounting import assert_downstream_outputs, assert_snapshot_accounting, done_shard_records
from tests.conftest import IN_CI, wait_for_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SNAP = demo.DEMO_CRAWL
SAFE = SNAP.replace("-", "_")
SNAPSHOT_DAG = f"laion_snapshot_{SAFE}"
ASSET_DAGS = (f"laion_index_{SAFE}", f"laion_train_eval_{SAFE}")
MONTHLY_DAG = "laion_monthly_ingest"
RUN_TIMEOUT_S = 900


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """Debian's redis-server on a free loopback port, no persistence."""
    exe = shutil.which("redis-server")
    if exe is None:
        message = "redis-server not installed (scripts/install-system-deps.sh installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


_T0 = time.monotonic()


def _log(message: str) -> None:
    """Progress with elapsed seconds (shown with -s, and in the captured output of a failure)."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", flush=True)


def _failures(stack: AirflowStack, dag_id: str, runs: list[dict[str, Any]]) -> str:
    return "\n".join(stack.failure_report(dag_id, r["dag_run_id"]) for r in runs if r["state"] != "success")


def _deploy_and_check(tmp_path: Path, postgres, moto_server, s3_root: str, name: str, executor: str, broker_url: str | None, backfill: bool) -> None:  # type: ignore[no-untyped-def]
    global _T0
    _T0 = time.monotonic()
    lineage_url = postgres.create_database(f"{name}_lineage")
    env = demo.prepare(
        tmp_path / "work",
        storage_root=s3_root,
        lineage_url=lineage_url,
        extra_config={"storage": {"s3_endpoint_url": moto_server.url}},
        n_wat=2,
        pages_per_wat=6,
    )
    settings = load_settings(env.config_path, environ={})
    storage.configure(settings.storage)
    lineage = Lineage(lineage_url)
    try:
        with AirflowStack(
            env.work / "airflow",
            dags_folder=demo.REPO / "dags",
            plugins_folder=demo.REPO / "plugins",
            executor=executor,  # type: ignore[arg-type]
            metadata_url=postgres.create_database(f"{name}_airflow"),
            broker_url=broker_url,
            extra_env={"LAION_CONFIG": str(env.config_path)},
        ) as stack:
            _log(f"{executor} stack healthy at {stack.base_url}")
            for dag_id in (SNAPSHOT_DAG, *ASSET_DAGS):
                stack.unpause(dag_id)
            conf = {"wat_paths_uri": f"{env.base_url}crawl-data/{SNAP}/wat.paths.gz"}
            run_id = stack.trigger(SNAPSHOT_DAG, conf)
            state = stack.wait_run(SNAPSHOT_DAG, run_id, RUN_TIMEOUT_S)
            assert state == "success", stack.failure_report(SNAPSHOT_DAG, run_id)
            _log(f"snapshot run {state}")

            # started by the curate tasks' Asset events, not by this test
            for dag_id in ASSET_DAGS:
                runs = stack.wait_runs(dag_id, 1, RUN_TIMEOUT_S)
                assert [r["run_type"] for r in runs] == ["asset_triggered"], runs
                assert [r["state"] for r in runs] == ["success"], _failures(stack, dag_id, runs)
                _log(f"{dag_id} asset-triggered run succeeded")
            assert_snapshot_accounting(settings, lineage, SNAP)  # after the asset DAGs: no stage still running
            assert_downstream_outputs(settings, lineage, SNAP)

            if backfill:
                done_before = done_shard_records(lineage, SNAP)
                # Unpause first: a paused DAG's backfill runs stay queued. Unpausing starts the latest
                # month's run (catchup=False); wait for it, because backfill runs are not counted against
                # the DAG's max_active_runs and every month here resolves to the same crawl.
                stack.unpause(MONTHLY_DAG)
                scheduled = stack.wait_runs(MONTHLY_DAG, 1, RUN_TIMEOUT_S)
                assert [(r["run_type"], r["state"]) for r in scheduled] == [("scheduled", "success")], _failures(stack, MONTHLY_DAG, scheduled)
                _log("latest month's scheduled run succeeded")
                stack.cli(
                    "backfill", "create", "--dag-id", MONTHLY_DAG, "--from-date", "2000-02-01", "--to-date", "2000-03-31",
                    "--max-active-runs", "1",
                )  # fmt: skip
                runs = stack.wait_runs(MONTHLY_DAG, 3, RUN_TIMEOUT_S)
                _log(f"monthly runs finished: {[(r['run_type'], r['state']) for r in runs]}")
                backfills = [r for r in runs if r["run_type"] == "backfill"]
                assert sorted(r["logical_date"][:10] for r in backfills) == ["2000-02-01", "2000-03-01"], runs
                assert all(r["state"] == "success" for r in runs), _failures(stack, MONTHLY_DAG, runs)
                # each month resolved the fixture crawl (released 2000-01-10) and skipped its done shards
                assert done_shard_records(lineage, SNAP) == done_before
                assert_snapshot_accounting(settings, lineage, SNAP)
    finally:
        env.stop()


def test_local_executor_deployment(tmp_path: Path, postgres, moto_server, s3_root: str) -> None:  # type: ignore[no-untyped-def]
    _deploy_and_check(tmp_path, postgres, moto_server, s3_root, "deploy_local", "LocalExecutor", None, backfill=True)


def test_celery_executor_deployment(tmp_path: Path, postgres, moto_server, s3_root: str, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    _deploy_and_check(tmp_path, postgres, moto_server, s3_root, "deploy_celery", "CeleryExecutor", redis_url, backfill=False)
