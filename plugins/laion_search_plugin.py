"""Airflow 3 UI plugin: the LAION search app under ``/laion-search/`` with a nav link.

Which index: ``LAION_SEARCH_INDEX_DIR`` if set, else
``layout.index_dir(storage.root, serve.snapshot or orchestration.snapshots[0], serve.subset)``
from the settings in ``LAION_CONFIG`` / ``LAION_*``.

Authentication: Airflow mounts plugin ``fastapi_apps`` with ``app.mount`` and adds no
auth of its own, so every route of this app depends on Airflow's
``requires_authenticated()``: it resolves the user from the ``Authorization: Bearer``
JWT or the UI's ``_token`` cookie through the configured auth manager (401 without one,
403 for an invalid token). FastAPI's own ``/openapi.json``, ``/docs`` and ``/redoc`` would skip
that dependency, so they are off and the schema is an ordinary, guarded route
(:mod:`laion_tasks.serve.schema`). The nav link renders the page in an iframe on the same origin,
so the browser sends the cookie and a logged-in user just sees the page.

Import stays cheap (no torch, no faiss: the index opens on the first query) and never
raises: a missing index gives a page saying how to build it, a broken config a page
naming the error.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

URL_PREFIX = "/laion-search"
INDEX_DIR_ENV = "LAION_SEARCH_INDEX_DIR"


def _auth_dependencies() -> list[Any]:
    from fastapi import Depends

    from airflow.api_fastapi.core_api.security import requires_authenticated

    return [Depends(requires_authenticated())]


def resolve_index_dir() -> tuple[str, Any]:
    """(index directory, settings) from the environment and LAION_CONFIG."""
    from laion_tasks import layout, storage
    from laion_tasks.config import load_settings

    settings = load_settings()
    storage.configure(settings.storage)
    explicit = os.environ.get(INDEX_DIR_ENV)
    if explicit:
        return explicit, settings
    snapshot = settings.serve.snapshot or settings.orchestration.snapshots[0]
    return layout.index_dir(settings.storage.root, snapshot, settings.serve.subset), settings


def _error_app(message: str, dependencies: list[Any]):  # type: ignore[no-untyped-def]
    import html

    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    # FastAPI's built-in schema/docs routes skip app-level dependencies: keep them off.
    app = FastAPI(title="LAION search (unavailable)", dependencies=dependencies, openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (
            "<!doctype html><title>LAION search</title><h2>LAION search is not configured</h2>"
            f"<pre>{html.escape(message)}</pre><p>Set LAION_CONFIG (or {INDEX_DIR_ENV}) for the Airflow API server "
            "and restart it.</p>"
        )

    return app


def build_app():  # type: ignore[no-untyped-def]
    """The search app, or a page explaining what is wrong; never an exception."""
    try:
        dependencies = _auth_dependencies()
    except Exception as exc:  # noqa: BLE001 - outside an API server the auth module may not import
        log.warning("LAION search: Airflow auth unavailable (%s); the app will refuse every request", exc)
        from fastapi import HTTPException

        def refuse() -> None:
            raise HTTPException(503, "Airflow authentication is unavailable in this process")

        from fastapi import Depends

        dependencies = [Depends(refuse)]
    try:
        from laion_tasks.serve.app import create_app

        index_dir, settings = resolve_index_dir()
        return create_app(index_dir, settings, dependencies=dependencies)
    except Exception as exc:  # noqa: BLE001 - a plugin must never take the API server down
        log.exception("LAION search plugin could not start")
        return _error_app(f"{type(exc).__name__}: {exc}", dependencies)


class LaionSearchPlugin(AirflowPlugin):
    name = "laion_search"
    fastapi_apps = [{"name": "laion_search", "app": build_app(), "url_prefix": URL_PREFIX}]
    external_views = [
        {
            "name": "LAION search",
            "href": URL_PREFIX.lstrip("/") + "/",  # relative: works behind a base_url / proxy
            "destination": "nav",
            "category": "browse",
            "url_route": "laion-search",
        }
    ]
