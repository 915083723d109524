"""``laion funnel`` and ``laion shards``: audit what ran and where the candidates went."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laion_tasks.commands._common import (
    ConfigOption,
    echo_json,
    require_snapshot,
    settings_from,
    snapshot_option,
)


def register(app: typer.Typer) -> None:
    @app.command("funnel")
    def funnel(
        snapshot: str = snapshot_option(),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Counts per stage and outcome over the done shards of a snapshot."""
        from laion_tasks.lineage import Lineage

        settings = settings_from(config)
        require_snapshot(settings, snapshot)
        rows = Lineage(settings.lineage.url).funnel(snapshot)
        if as_json:
            echo_json([row.__dict__ for row in rows])
            return
        typer.echo(f"{'stage':<10} {'outcome':<40} {'count':>10} {'shards':>7}")
        for row in rows:
            typer.echo(f"{row.stage:<10} {row.outcome:<40} {row.count:>10} {row.shards:>7}")

    @app.command("shards")
    def shards(
        snapshot: str = snapshot_option(),
        stage: Optional[str] = typer.Option(None, "--stage", help="Only this stage's attempts."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Every recorded attempt: stage, shard, status, attempt, config digest, error."""
        from laion_tasks.lineage import Lineage

        settings = settings_from(config)
        require_snapshot(settings, snapshot)
        lineage = Lineage(settings.lineage.url)
        echo_json(
            [
                {k: r[k] for k in ("stage", "shard_id", "status", "attempt", "config_digest", "inputs_digest", "output_uri",
                                  "duration_s", "error")}
                for r in lineage.runs(snapshot, stage)
            ]
        )
        typer.echo(f"summary: {lineage.shard_summary(snapshot)}")

    @app.command("serve-lineage")
    def serve_lineage(
        host: str = typer.Option("127.0.0.1", help="Bind address."),
        port: int = typer.Option(8766, help="Port."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Serve the lineage views (snapshots, funnel, failed shards, dataset cards) without Airflow."""
        import uvicorn

        from laion_tasks.serve.lineage_app import create_lineage_app

        settings = settings_from(config)
        typer.echo(f"lineage UI: http://{host}:{port}/")
        uvicorn.run(create_lineage_app(settings), host=host, port=port, log_level="warning")
