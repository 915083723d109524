"""OpenAPI for the plugin apps, only behind the app's own dependencies (Airflow's session check).

FastAPI's built-in ``/openapi.json``, ``/docs`` and ``/redoc`` are plain Starlette routes: the
app-level ``dependencies`` that guard every API route do not apply to them, so under Airflow
they answered without a session and the search schema named the index location. Both apps
therefore turn them off (``NO_BUILTIN_DOCS``) and serve the schema as an ordinary API route
(``add_openapi_route``), which the dependencies do guard. The HTML viewers stay off: they load
their scripts from a CDN, which the apps' Content-Security-Policy and offline deployments refuse.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

NO_BUILTIN_DOCS: dict[str, Any] = {"openapi_url": None, "docs_url": None, "redoc_url": None}
"""``FastAPI(**NO_BUILTIN_DOCS)``: no unguarded schema or docs routes."""


def add_openapi_route(app: FastAPI) -> None:
    """``GET openapi.json`` as an API route, so it needs whatever every other route of ``app`` needs."""

    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()
