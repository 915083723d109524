"""The product as a deployment runs it (issue #11): Airflow's api-server, scheduler,
dag-processor and triggerer started on loopback with the CeleryExecutor (what docker-compose.yaml
deploys: Redis and ``airflow celery worker``), PostgreSQL as the metadata and lineage database,
moto's S3 server for the data, the fixture crawl served over HTTP.

- The snapshot DAG is triggered through the REST API with a conf, as the UI's Trigger form posts it.
- The index and train -> eval DAGs must start from the curate tasks' Asset events.
- Every candidate is counted exactly once per stage and subset (tests/accounting.py).
- Scored with the demo's world model, the outputs agree with the truth the fixture crawl planted
  (tests/world_checks.py: CLIP filter, search, zero-shot, pwatermark, near-dups, punsafe).

The LocalExecutor stack is tests/test_airflow_browser.py: the same checks after a run triggered from
the UI's form in a browser, and ``airflow backfill create`` of the monthly ingest. One stack per
executor: each stack and its DAG run are the costliest part of ``make test``. ``airflow dags test``
stays in test_e2e.py and test_dags.py, where one process is the cheaper check.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from laion_tasks import demo, storage
from laion_tasks.airflow_local import AirflowStack, free_port
from laion_tasks.config import load_settings
from laion_tasks.lineage import Lineage
from tests.airflow_checks import RUN_TIMEOUT_S, assert_after_snapshot_run, asset_dags
from tests.conftest import IN_CI, wait_for_port
from tests.world_checks import assert_world_checks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SNAP = demo.DEMO_CRAWL
SNAPSHOT_DAG = "laion_snapshot_" + SNAP.replace("-", "_")


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


def test_celery_executor_deployment(tmp_path: Path, postgres, moto_server, s3_root: str, redis_url: str, world_model) -> None:  # type: ignore[no-untyped-def]
    global _T0
    _T0 = time.monotonic()
    lineage_url = postgres.create_database("deploy_celery_lineage")
    env = demo.prepare(
        tmp_path / "work",
        storage_root=s3_root,
        lineage_url=lineage_url,
        extra_config={"storage": {"s3_endpoint_url": moto_server.url}},
        n_wat=2,
        pages_per_wat=6,
        world=world_model,
    )
    settings = load_settings(env.config_path, environ={})
    storage.configure(settings.storage)
    lineage = Lineage(lineage_url)
    try:
        with AirflowStack(
            env.work / "airflow",
            dags_folder=demo.REPO / "dags",
            plugins_folder=demo.REPO / "plugins",
            executor="CeleryExecutor",
            metadata_url=postgres.create_database("deploy_celery_airflow"),
            broker_url=redis_url,
            extra_env={"LAION_CONFIG": str(env.config_path)},
        ) as stack:
            _log(f"CeleryExecutor stack healthy at {stack.base_url}")
            for dag_id in (SNAPSHOT_DAG, *asset_dags(SNAP)):
                stack.unpause(dag_id)
            conf = {"wat_paths_uri": f"{env.base_url}crawl-data/{SNAP}/wat.paths.gz"}
            run_id = stack.trigger(SNAPSHOT_DAG, conf)
            state = stack.wait_run(SNAPSHOT_DAG, run_id, RUN_TIMEOUT_S)
            assert state == "success", stack.failure_report(SNAPSHOT_DAG, run_id)
            _log(f"snapshot run {state}")
            assert_after_snapshot_run(stack, settings, lineage, SNAP, _log)
            assert_world_checks(settings, SNAP, env.truth_path, env.crawl_dir)
            _log("world checks passed")
    finally:
        env.stop()
