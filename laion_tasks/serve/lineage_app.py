"""Lineage and dataset-card views: what ran on which shards, the funnel, and the card.

A plain FastAPI app (no Airflow import); ``plugins/laion_lineage_plugin.py`` mounts it in
the Airflow 3 UI behind Airflow's authentication, and ``laion serve-lineage`` serves it
standalone.
"""

from __future__ import annotations

import html
import mimetypes
from typing import Any, Sequence

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, Response

from laion_tasks import layout, storage
from laion_tasks.config import Settings
from laion_tasks.lineage import Lineage

_STYLE = (
    "<style>body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1200px}"
    "table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}"
    "td.n{text-align:right}.failed{color:#b00}.done{color:#070}pre{background:#f6f6f6;padding:1rem;overflow:auto}</style>"
)


def _page(title: str, body: str) -> str:
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}</head><body>{body}</body></html>"


def create_lineage_app(settings: Settings, dependencies: Sequence[Any] = ()) -> FastAPI:
    app = FastAPI(title="LAION lineage", dependencies=list(dependencies))
    storage.configure(settings.storage)
    root = settings.storage.root

    def lineage() -> Lineage:
        return Lineage(settings.lineage.url)

    def valid(value: str, what: str) -> str:
        """Every path parameter is checked before it reaches lineage or storage (400 if unsafe)."""
        try:
            return layout.check_name(value, what)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc

    def known_snapshot(snapshot: str) -> None:
        valid(snapshot, "snapshot")
        if snapshot not in {s["id"] for s in lineage().snapshots()}:
            raise HTTPException(404, f"snapshot {snapshot!r} has no lineage records")

    @app.get("/api/snapshots")
    def snapshots() -> list[dict[str, Any]]:
        lin = lineage()
        return [{**s, "shards": lin.shard_summary(s["id"])} for s in lin.snapshots()]

    @app.get("/api/funnel/{snapshot}")
    def funnel(snapshot: str) -> list[dict[str, Any]]:
        known_snapshot(snapshot)
        return [row.__dict__ for row in lineage().funnel(snapshot)]

    @app.get("/api/shards/{snapshot}")
    def shards(
        snapshot: str,
        stage: str | None = None,
        status: str | None = Query(None, pattern="^(running|done|failed|superseded)$"),
        limit: int = Query(500, ge=1, le=10_000),
    ) -> list[dict[str, Any]]:
        known_snapshot(snapshot)
        rows = [r for r in lineage().runs(snapshot, stage) if status is None or r["status"] == status]
        return rows[-limit:]

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        parts = ["<h1>LAION lineage</h1>"]
        snaps = lineage().snapshots()
        if not snaps:
            parts.append(f"<p>No snapshot has run yet (lineage database <code>{html.escape(settings.lineage.url.split('@')[-1])}</code>).</p>")
        for snap in snaps:
            sid = html.escape(snap["id"])
            summary = ", ".join(
                f"{html.escape(stage)}: " + " / ".join(f"{n} {html.escape(st)}" for st, n in sorted(c.items()))
                for stage, c in lineage().shard_summary(snap["id"]).items()
            )
            parts.append(f"<h2><a href='snapshot/{sid}'>{sid}</a></h2><p>{summary}</p>")
        return _page("LAION lineage", "".join(parts))

    @app.get("/snapshot/{snapshot}", response_class=HTMLResponse)
    def snapshot_page(snapshot: str) -> str:
        known_snapshot(snapshot)
        lin = lineage()
        sid = html.escape(snapshot)
        rows = "".join(
            f"<tr><td>{html.escape(r.stage)}</td><td>{html.escape(r.outcome)}</td><td class=n>{r.count:,}</td><td class=n>{r.shards:,}</td></tr>"
            for r in lin.funnel(snapshot)
        )
        failed = [r for r in lin.runs(snapshot) if r["status"] == "failed"][-50:]
        failed_rows = "".join(
            f"<tr class=failed><td>{html.escape(r['stage'])}</td><td>{html.escape(r['shard_id'])}</td><td>{r['attempt']}</td>"
            f"<td>{html.escape(str(r['input_uri']))}</td><td><pre>{html.escape((r['error'] or '')[:2000])}</pre></td></tr>"
            for r in failed
        )
        card_link = (
            f"<p><a href='../card/{sid}/README.md'>Dataset card</a></p>"
            if storage.exists(storage.join(layout.card_dir(root, snapshot), "README.md"))
            else "<p>No dataset card yet.</p>"
        )
        body = (
            f"<p><a href='../'>&larr; snapshots</a></p><h1>{sid}</h1>{card_link}"
            "<h2>Funnel (done shards)</h2><table><tr><th>stage</th><th>outcome</th><th>samples</th><th>shards</th></tr>"
            f"{rows}</table>"
            f"<h2>Failed attempts ({len(failed)})</h2>"
            + (
                "<table><tr><th>stage</th><th>shard</th><th>attempt</th><th>input</th><th>error</th></tr>" + failed_rows + "</table>"
                if failed
                else "<p>none</p>"
            )
            + f"<p>JSON: <a href='../api/funnel/{sid}'>funnel</a>, <a href='../api/shards/{sid}'>shard runs</a></p>"
        )
        return _page(snapshot, body)

    @app.get("/card/{snapshot}/{name:path}")
    def card_file(snapshot: str, name: str) -> Response:
        """The dataset card's files: README.md rendered as a page with its charts, PNGs as images."""
        valid(snapshot, "snapshot")
        for segment in name.split("/"):
            valid(segment, "card path")
        uri = storage.join(layout.card_dir(root, snapshot), name)
        if not storage.exists(uri):
            raise HTTPException(404, f"no card file {name!r} for snapshot {snapshot!r}")
        data = storage.read_bytes(uri)
        if name.endswith(".md"):
            text = data.decode("utf-8")
            charts = "".join(
                f"<p><img src='{html.escape(u.rsplit('/', 1)[-1])}' style='max-width:100%'></p>"
                for u in storage.list_uris(layout.card_dir(root, snapshot), ".png")
            )
            return HTMLResponse(_page(f"{snapshot} card", f"{charts}<pre>{html.escape(text)}</pre>"))
        return Response(data, media_type=mimetypes.guess_type(name)[0] or "application/octet-stream")

    return app
