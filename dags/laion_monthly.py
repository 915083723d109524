"""Monthly ingest of the newest Common Crawl snapshot.

Each run resolves the newest crawl released before its logical date from Common
Crawl's ``collinfo.json`` and runs the whole snapshot graph on it. Past crawls are
processed by backfilling, e.g.::

    airflow backfill create --dag-id laion_monthly_ingest \
        --from-date 2024-01-01 --to-date 2024-06-30 --reprocess-behavior failed
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task

from laion_common.graph import build_snapshot_graph, run_settings, snapshot_params, task_defaults
from laion_tasks.config import load_settings

SETTINGS = load_settings()


@task
def resolve_crawl() -> str:
    from laion_tasks.crawls import fetch_collinfo, newest_crawl_before

    settings, _ = run_settings()
    context = get_current_context()
    logical = context.get("logical_date") or context["dag_run"].run_after
    crawl = newest_crawl_before(fetch_collinfo(settings.orchestration.collinfo_url), logical)
    return crawl


@dag(
    dag_id="laion_monthly_ingest",
    description="Resolve and process the newest Common Crawl snapshot each month",
    schedule="@monthly",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=snapshot_params(SETTINGS),
    default_args=task_defaults(SETTINGS),
    tags=["laion", "monthly"],
    doc_md=__doc__,
)
def laion_monthly_ingest() -> None:
    build_snapshot_graph(resolve_crawl(), SETTINGS)


laion_monthly_ingest()
