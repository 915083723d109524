"""``laion config``: show the effective settings and their digests."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laion_tasks.commands._common import ConfigOption, settings_from


def register(app: typer.Typer) -> None:
    @app.command("config")
    def show_config(config: Optional[Path] = ConfigOption) -> None:
        """Print the effective configuration (defaults < YAML < LAION_* env) as YAML."""
        settings = settings_from(config)
        typer.echo(settings.to_yaml())
        typer.echo(f"# digest: {settings.digest()}")
