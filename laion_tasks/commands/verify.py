"""``laion verify``: check that a snapshot is whole (see :mod:`laion_tasks.verify`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laion_tasks.commands._common import (
    ConfigOption,
    require_snapshot,
    settings_from,
    snapshot_option,
)


def register(app: typer.Typer) -> None:
    @app.command("verify")
    def verify(
        snapshot: str = snapshot_option(),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Check a finished or half-finished snapshot: one line per problem, exit 1 if any."""
        from laion_tasks.lineage import Lineage
        from laion_tasks.verify import verify_and_record

        settings = settings_from(config)
        require_snapshot(settings, snapshot)
        problems = verify_and_record(settings, snapshot, Lineage(settings.lineage.url))
        for problem in problems:
            typer.echo(problem.line())
        if problems:
            typer.echo(f"{snapshot}: {len(problems)} problem(s)", err=True)
            raise typer.Exit(1)
        typer.echo(f"{snapshot}: verified")
