"""Airflow 3 UI plugin: lineage views (snapshots, funnel, failed shards) and dataset cards.

Mounted at ``/laion-lineage/`` with a nav link (Browse menu) and a tab on each DAG's page
(``/laion-lineage/dag/{DAG_ID}`` opens that snapshot's page); both render in Airflow's iframe
on the same origin, styled with Airflow's colours. Every route requires an authenticated
Airflow user (the same dependency as the search plugin). Import never raises: a broken
config gives a page naming the error.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

URL_PREFIX = "/laion-lineage"


def _auth_dependencies() -> list[Any]:
    from fastapi import Depends, HTTPException

    try:
        from airflow.api_fastapi.core_api.security import requires_authenticated

        return [Depends(requires_authenticated())]
    except Exception as exc:  # noqa: BLE001 - outside the API server the auth module may not import
        log.warning("LAION lineage: Airflow auth unavailable (%s); refusing every request", exc)

        def refuse() -> None:
            raise HTTPException(503, "Airflow authentication is unavailable in this process")

        return [Depends(refuse)]


def build_app():  # type: ignore[no-untyped-def]
    dependencies = _auth_dependencies()
    try:
        from laion_tasks.config import load_settings
        from laion_tasks.serve.lineage_app import create_lineage_app

        return create_lineage_app(load_settings(), dependencies=dependencies)
    except Exception as exc:  # noqa: BLE001 - a plugin must never take the API server down
        import html

        from fastapi import FastAPI
        from fastapi.responses import HTMLResponse

        log.exception("LAION lineage plugin could not start")
        # FastAPI's built-in schema/docs routes skip app-level dependencies: keep them off.
        app = FastAPI(title="LAION lineage (unavailable)", dependencies=dependencies, openapi_url=None, docs_url=None, redoc_url=None)
        message = f"{type(exc).__name__}: {exc}"

        @app.get("/", response_class=HTMLResponse)
        def page() -> str:
            return f"<!doctype html><h2>LAION lineage is not configured</h2><pre>{html.escape(message)}</pre>"

        return app


class LaionLineagePlugin(AirflowPlugin):
    name = "laion_lineage"
    fastapi_apps = [{"name": "laion_lineage", "app": build_app(), "url_prefix": URL_PREFIX}]
    external_views = [
        {
            "name": "LAION lineage",
            "href": URL_PREFIX.lstrip("/") + "/",
            "destination": "nav",
            "category": "browse",
            "url_route": "laion-lineage",
        },
        {
            # A tab on each DAG's page: a snapshot DAG's tab opens that snapshot's lineage.
            "name": "LAION lineage",
            "href": URL_PREFIX.lstrip("/") + "/dag/{DAG_ID}",
            "destination": "dag",
            "url_route": "laion-lineage-dag",
        },
    ]
