"""Every route of both Airflow plugin apps refuses a request without a session (issue 18, item 6).

The routes are not listed by hand: they are enumerated from the apps as Airflow mounts them
(``app.mount(url_prefix, app)``, walking into every mount), so a route added later, or one a
framework adds by itself (FastAPI's ``/openapi.json``, ``/docs``, ``/redoc``), is checked too.
Each method of each route is requested without a session (401) and with a forged ``_token``
cookie (403), the two refusals Airflow's ``requires_authenticated()`` gives. Logged in, the same
requests are not refused, so the refusals come from the session check and not from a missing
route or a bad parameter.
"""

from __future__ import annotations

import importlib.util
import re
import types
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Host, Mount, Route, WebSocketRoute

REPO = Path(__file__).resolve().parent.parent
PLUGINS = {"search": "laion_search_plugin.py", "lineage": "laion_lineage_plugin.py"}
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset()
"""(method, mounted path) pairs that may answer without a session. None: even ``/healthz`` needs one."""
REFUSED_ANONYMOUS = 401
REFUSED_FORGED = 403
SAMPLE_PARAM = {"path": "card/README.md", "int": "1", "float": "1.5", "uuid": str(uuid.UUID(int=1)), "str": "CC-MAIN-2024-10"}
"""A value for each Starlette path convertor, so a parametrised route is reached, not a 404."""


def _load(name: str, module_name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, REPO / "plugins" / PLUGINS[name])
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _concrete(path: str) -> str:
    """``/files/{snapshot}/{path:path}`` -> a requestable path with a sample value per parameter."""
    return re.sub(r"\{\w+(?::(\w+))?\}", lambda m: SAMPLE_PARAM[m.group(1) or "str"], path)


def endpoints(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(method, route path, concrete path) for every HTTP endpoint under ``routes``, mounts included.

    An unknown kind of route fails the test rather than being skipped, so it cannot slip through.
    """
    for route in routes:
        if isinstance(route, Mount):
            inner = route.routes
            if inner:
                yield from endpoints(inner, prefix + route.path)
            else:  # a mounted ASGI app without a router (static files, a proxy): probe below it
                yield "GET", prefix + route.path + "/{path:path}", _concrete(prefix + route.path + "/{path:path}")
        elif isinstance(route, Route):  # FastAPI's APIRoute is a Route
            for method in sorted(route.methods or {"GET"}):
                yield method, prefix + route.path, _concrete(prefix + route.path)
        elif isinstance(route, (WebSocketRoute, Host)):
            raise AssertionError(f"{type(route).__name__} {prefix}{getattr(route, 'path', '')}: extend this test to check it")
        else:
            raise AssertionError(f"unknown route type {type(route).__name__} under {prefix or '/'}: extend this test")


@pytest.fixture
def mounted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Starlette, list[Any], str]:
    """Both plugins' apps mounted at their prefixes as Airflow's API server mounts them.

    ``request.param`` is "configured" (the real apps) or "broken" (the error pages a bad
    config gives). Returns (host app, sub-apps, index dir).
    """
    from airflow.api_fastapi import app as airflow_app

    index_dir = str(tmp_path / "secret-index-location")
    monkeypatch.setenv("LAION_SEARCH_INDEX_DIR", index_dir)
    monkeypatch.setenv("LAION_STORAGE__ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("LAION_LINEAGE__URL", f"sqlite:///{tmp_path / 'lineage.db'}")
    if request.param == "broken":
        monkeypatch.setenv("LAION_CONFIG", str(tmp_path / "no-such-config.yaml"))
    else:
        monkeypatch.delenv("LAION_CONFIG", raising=False)
    # A forged cookie is checked by Airflow's auth manager, as in the API server.
    monkeypatch.setattr(airflow_app._AuthManagerState, "instance", airflow_app.create_auth_manager())
    host = Starlette()
    apps = []
    for name in PLUGINS:
        module = _load(name, f"laion_{name}_plugin_routes_under_test")
        plugin = next(v for v in vars(module).values() if isinstance(v, type) and getattr(v, "fastapi_apps", None))
        for entry in plugin.fastapi_apps:
            title = entry["app"].title
            assert ("unavailable" in title) == (request.param == "broken"), title
            host.mount(entry["url_prefix"], entry["app"])
            apps.append(entry["app"])
    return host, apps, index_dir


@pytest.mark.parametrize("mounted", ["configured", "broken"], indirect=True)
def test_every_plugin_route_refuses_requests_without_a_session(mounted: tuple[Starlette, list[Any], str]) -> None:
    from airflow.api_fastapi.core_api.security import get_user

    host, apps, index_dir = mounted
    found = list(endpoints(host.routes))
    paths = {path for _, path, _ in found}
    assert {"/laion-search/", "/laion-lineage/"} <= paths  # the walk reached both apps
    if "unavailable" not in apps[0].title:
        expected = {
            "/laion-search/api/search", "/laion-search/api/search/image", "/laion-search/api/export",
            "/laion-search/healthz", "/laion-search/openapi.json",
            "/laion-lineage/files/{snapshot}/{path:path}", "/laion-lineage/dag/{dag_id}", "/laion-lineage/openapi.json",
        }
        assert expected <= paths, expected - paths
    unknown_public = {p for p in PUBLIC_ROUTES if p not in {(m, path) for m, path, _ in found}}
    assert not unknown_public, f"PUBLIC_ROUTES names routes that do not exist: {unknown_public}"

    anonymous = TestClient(host, follow_redirects=False)
    forged = TestClient(host, cookies={"_token": "not-a-jwt"}, follow_redirects=False)
    reachable = []
    for method, path, url in found:
        if (method, path) in PUBLIC_ROUTES:
            continue
        for client, refusal in ((anonymous, REFUSED_ANONYMOUS), (forged, REFUSED_FORGED)):
            resp = client.request(method, url)
            if resp.status_code != refusal or index_dir in resp.text:
                reachable.append(f"{method} {url} -> {resp.status_code} {resp.text[:120]!r}")
    assert not reachable, "answered without a valid session:\n" + "\n".join(reachable)

    # FastAPI's built-in schema and docs are not there at all (not even behind a redirect).
    for prefix in ("/laion-search", "/laion-lineage"):
        for builtin in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert anonymous.get(prefix + builtin).status_code == 404, prefix + builtin

    # Logged in, nothing is refused: the refusals above came from the session check.
    for app in apps:
        app.dependency_overrides[get_user] = lambda: object()  # what a valid Airflow session resolves to
    logged_in = TestClient(host, follow_redirects=False)
    refused = [f"{m} {url}" for m, _, url in found if logged_in.request(m, url).status_code in (401, 403)]
    assert not refused, refused
    if "unavailable" not in apps[0].title:
        schema = logged_in.get("/laion-search/openapi.json")
        assert schema.status_code == 200 and "/api/search" in schema.json()["paths"]
        assert "/api/funnel/{snapshot}" in logged_in.get("/laion-lineage/openapi.json").json()["paths"]
