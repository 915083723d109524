"""Lineage and dataset-card views: what ran on which shards, the funnel, and the card.

A plain FastAPI app (no Airflow import); ``plugins/laion_lineage_plugin.py`` mounts it in
the Airflow 3 UI behind Airflow's authentication, and ``laion serve-lineage`` serves it
standalone. Queries live in :mod:`lineage_queries`, markup in :mod:`lineage_pages`.

Every link is relative, so the app works at ``/`` and under Airflow's ``/laion-lineage/``.
A strict Content-Security-Policy allows only this app's own script and images (inline styles
only for Markdown table alignment).
"""

from __future__ import annotations

import mimetypes
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from laion_tasks import layout, storage
from laion_tasks.config import Settings
from laion_tasks.lineage import Lineage
from laion_tasks.serve import lineage_pages as pages
from laion_tasks.serve import lineage_queries as q
from laion_tasks.serve.schema import NO_BUILTIN_DOCS, add_openapi_route
from laion_tasks.serve.theme import static_file

CARD_ROOTS = ("card", "subsets")
"""Folders of a snapshot the file route may serve: the dataset card and the subsets' cards."""
CSP = (
    "default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
    "frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
)


def _href(*segments: str) -> str:
    return "/".join(quote(s, safe="") for s in segments)


def create_lineage_app(settings: Settings, dependencies: Sequence[Any] = ()) -> FastAPI:
    app = FastAPI(title="LAION lineage", dependencies=list(dependencies), **NO_BUILTIN_DOCS)
    add_openapi_route(app)
    storage.configure(settings.storage)
    root = settings.storage.root

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    def lineage() -> Lineage:
        return Lineage(settings.lineage.url)

    def valid(value: str, what: str) -> str:
        """Every path parameter is checked before it reaches lineage or storage (400 if unsafe)."""
        try:
            return layout.check_name(value, what)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc

    def known_snapshot(snapshot: str) -> Lineage:
        valid(snapshot, "snapshot")
        lin = lineage()
        if not q.has_snapshot(lin, snapshot):
            raise HTTPException(404, f"snapshot {snapshot!r} has no lineage records")
        return lin

    def card_uri(snapshot: str) -> str:
        return storage.join(layout.card_dir(root, snapshot), "README.md")

    # -- JSON --------------------------------------------------------------------
    @app.get("/api/snapshots")
    def snapshots() -> list[dict[str, Any]]:
        lin = lineage()
        return [{**s, "stages": [st.__dict__ for st in q.stage_status(lin, s["id"])]} for s in q.snapshots(lin)]

    @app.get("/api/funnel/{snapshot}")
    def funnel(snapshot: str) -> list[dict[str, Any]]:
        return [row.__dict__ for row in q.funnel(known_snapshot(snapshot), snapshot)]

    @app.get("/api/stages/{snapshot}")
    def stages(snapshot: str) -> list[dict[str, Any]]:
        return [s.__dict__ for s in q.stage_status(known_snapshot(snapshot), snapshot)]

    @app.get("/api/shards/{snapshot}")
    def shards(
        snapshot: str,
        stage: str | None = None,
        status: str | None = Query(None, pattern="^(running|done|failed|superseded)$"),
        limit: int = Query(500, ge=1, le=10_000),
    ) -> list[dict[str, Any]]:
        return q.shard_runs(known_snapshot(snapshot), snapshot, stage, status, limit)

    # -- pages ---------------------------------------------------------------------
    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        return static_file(name)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        lin = lineage()
        snaps = q.snapshots(lin)
        if not snaps:
            where = settings.lineage.url.split("@")[-1]
            return pages.page("LAION lineage", f"<h1>LAION lineage</h1><p class='muted'>No snapshot has run yet (lineage database <code>{pages.esc(where)}</code>).</p>")
        cards = []
        for snap in snaps:
            sid = snap["id"]
            stage_rows = q.stage_status(lin, sid)
            bars = "".join(
                f"<tr><td>{pages.esc(s.stage)}</td><td>{pages.status_bar(s, width=140, height=10)}</td>"
                f"<td class=n>{s.done:,}/{s.shards:,}</td><td class=n>{'<span class=s-failed>' + format(s.failed, ',') + ' failed</span>' if s.failed else ''}</td></tr>"
                for s in stage_rows
            )
            card = " · <a href='{}'>dataset card</a>".format(_href("files", sid, "card") + "/README.md") if storage.exists(card_uri(sid)) else ""
            cards.append(
                f"<div class='panel'><h2><a href='{_href('snapshot', sid)}'>{pages.esc(sid)}</a></h2>"
                f"<div class='muted'>created {pages.esc(str(snap['created_at'])[:19])} UTC{card}</div>"
                f"<table>{bars}</table></div>"
            )
        body = "<h1>LAION lineage</h1><p class='muted'>Per snapshot: shards per stage by their latest attempt.</p>"
        return pages.page("LAION lineage", body + "<div class='cards'>" + "".join(cards) + "</div>")

    @app.get("/snapshot/{snapshot}", response_class=HTMLResponse)
    def snapshot_page(snapshot: str) -> str:
        lin = known_snapshot(snapshot)
        rows = q.funnel(lin, snapshot)
        stage_rows = q.stage_status(lin, snapshot)
        failures = q.shards_with_failures(lin, snapshot)
        failing = sum(s.failed for s in stage_rows)
        fixed = sum(s.retried_done for s in stage_rows)
        has_card = storage.exists(card_uri(snapshot))
        card = (
            f"<a href='../{_href('files', snapshot, 'card')}/README.md'>Dataset card</a>"
            if has_card
            else "<span class='muted'>No dataset card yet (the curate DAG writes it).</span>"
        )
        api = _href(snapshot)
        body = (
            f"<h1>{pages.esc(snapshot)}</h1><div>{card}</div>"
            "<h2>Funnel</h2><p class='muted'>Rows each stage saw over its done shards, and what became of them.</p>"
            f"<div class='panel'>{pages.funnel_svg(rows)}</div>{pages.funnel_table(rows)}"
            "<h2>Shards per stage</h2><p class='muted'>State of each shard's latest attempt.</p>"
            f"{pages.stage_table(stage_rows)}"
            f"<h2>Failed shards ({failing:,} failing, {fixed:,} fixed by a retry)</h2>"
            f"{pages.failures_table(failures)}"
            f"<p class='muted'>JSON: <a href='../api/funnel/{api}'>funnel</a> · <a href='../api/stages/{api}'>stages</a> · "
            f"<a href='../api/shards/{api}'>shard attempts</a></p>"
        )
        return pages.page(snapshot, body, crumbs=(("LAION lineage", "../"), (snapshot, None)), static="../static/")

    @app.get("/dag/{dag_id}", response_class=HTMLResponse)
    def dag_tab(dag_id: str) -> Response:
        """The DAG-page tab: a snapshot DAG (``laion_*_<CC_MAIN_...>``) goes to its snapshot's page."""
        for snap in q.snapshots(lineage()):
            if dag_id.endswith("_" + snap["id"].replace("-", "_")):
                return RedirectResponse("../snapshot/" + _href(snap["id"]), status_code=303)
        body = f"<h1>LAION lineage</h1><p class='muted'>DAG <code>{pages.esc(dag_id)}</code> has no snapshot with lineage records.</p><p><a href='../'>All snapshots</a></p>"
        return HTMLResponse(pages.page("LAION lineage", body, static="../static/"))

    @app.get("/files/{snapshot}/{path:path}")
    def card_file(snapshot: str, path: str) -> Response:
        """A card's files: a README.md rendered as a page (with its charts), PNGs as images."""
        valid(snapshot, "snapshot")
        parts = [valid(segment, "card path") for segment in path.split("/")]
        if parts[0] not in CARD_ROOTS:
            raise HTTPException(400, f"invalid card path {path!r}: only {' and '.join(CARD_ROOTS)} are served")
        uri = storage.join(layout.snapshot_root(root, snapshot), *parts)
        if not storage.exists(uri):
            raise HTTPException(404, f"no card file {path!r} for snapshot {snapshot!r}")
        data = storage.read_bytes(uri)
        if not path.endswith(".md"):
            return Response(data, media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")
        up = "../" * (len(parts) + 1)
        crumbs = [("LAION lineage", up), (snapshot, up + _href("snapshot", snapshot))]
        if parts[0] == "subsets" and len(parts) > 2:
            crumbs += [("dataset card", up + _href("files", snapshot, "card") + "/README.md"), (f"subset {parts[1]}", None)]
        else:
            crumbs.append(("dataset card", None))
        body = f"<div class='markdown'>{pages.render_markdown(data.decode('utf-8', errors='replace'))}</div>"
        return HTMLResponse(pages.page(f"{snapshot} card", body, crumbs=crumbs, static=up + "static/"))

    return app
