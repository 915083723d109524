"""``laion serve``: the search API and web page over one index."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laion_tasks.commands._common import (
    CliError,
    ConfigOption,
    require_snapshot,
    settings_from,
    snapshot_option,
)


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        index_dir: Optional[str] = typer.Option(None, help="Index directory (default: from --snapshot/--subset)."),
        snapshot: Optional[str] = snapshot_option(required=False, help="Snapshot whose index to serve."),
        subset: Optional[str] = typer.Option(None, help="Subset whose index to serve (default serve.subset)."),
        host: Optional[str] = typer.Option(None, help="Bind address (default serve.host)."),
        port: Optional[int] = typer.Option(None, help="Port (default serve.port)."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Serve kNN search (text, image upload, embedding) with a web UI at http://HOST:PORT/."""
        import uvicorn

        from laion_tasks import layout, storage
        from laion_tasks.serve import create_app
        from laion_tasks.stages.index import MANIFEST_FILE

        settings = settings_from(config)
        if index_dir is None:
            if snapshot is None:
                raise typer.BadParameter("give --index-dir, or --snapshot (and --subset)")
            require_snapshot(settings, snapshot)
            index_dir = layout.index_dir(settings.storage.root, snapshot, subset or settings.serve.subset)
        if not storage.exists(storage.join(index_dir, MANIFEST_FILE)):  # fail fast; the app opens it lazily
            raise CliError(f"no index yet ({MANIFEST_FILE} missing; build it with `laion index` first)", index_dir)
        bind_host, bind_port = host or settings.serve.host, port or settings.serve.port
        typer.echo(f"search UI: http://{bind_host}:{bind_port}/")
        uvicorn.run(create_app(index_dir, settings), host=bind_host, port=bind_port, log_level="info")
