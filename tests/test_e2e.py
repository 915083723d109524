"""End to end: ``airflow dags test`` of the snapshot DAG on the fixture crawl, against real
PostgreSQL (Airflow metadata and lineage) and S3 (moto_server), then the accounting:
every candidate is accounted for exactly once at every stage and in every subset; and the
meaning: scored with the demo's world model, the outputs agree with the truth the fixture
crawl planted (tests/world_checks.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from laion_tasks import demo, storage
from laion_tasks.config import load_settings
from laion_tasks.lineage import Lineage
from tests.accounting import assert_downstream_outputs, assert_snapshot_accounting, done_shard_records
from tests.world_checks import assert_world_checks

pytestmark = pytest.mark.slow


def test_snapshot_dag_on_postgres_and_s3(tmp_path: Path, postgres, moto_server, s3_root: str, world_model) -> None:  # type: ignore[no-untyped-def]
    lineage_url = postgres.create_database("e2e_lineage")
    airflow_url = postgres.create_database("e2e_airflow")
    env = demo.prepare(
        tmp_path / "work",
        storage_root=s3_root,
        lineage_url=lineage_url,
        airflow_db_url=airflow_url,
        extra_config={"storage": {"s3_endpoint_url": moto_server.url}},
        n_wat=2,
        pages_per_wat=6,
        world=world_model,
    )
    try:
        demo.run_snapshot_dag(env)
        settings = load_settings(env.config_path, environ={})
        storage.configure(settings.storage)
        snap = demo.DEMO_CRAWL
        lineage = Lineage(lineage_url)
        assert_snapshot_accounting(settings, lineage, snap)

        # a re-run skips every finished shard: no new done records for the shard stages
        before = done_shard_records(lineage, snap)
        demo.run_snapshot_dag(env)
        assert done_shard_records(lineage, snap) == before

        # the Asset-triggered chain, run directly here: kNN index, and train -> eval -> card
        demo.run_downstream_dags(env)
        assert_downstream_outputs(settings, lineage, snap)
        assert_world_checks(settings, snap, env.truth_path, env.crawl_dir)
    finally:
        env.stop()
