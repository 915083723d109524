"""Options and helpers shared by CLI commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from laion_tasks import progress, storage
from laion_tasks.config import Settings, load_settings
from laion_tasks.lineage import Lineage

ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file (default: $LAION_CONFIG).", exists=True, dir_okay=False)


def settings_from(config: Optional[Path]) -> Settings:
    settings = load_settings(config)
    storage.configure(settings.storage)
    progress.configure(settings.orchestration.progress_interval_s)
    return settings


def lineage_from(settings: Settings, enabled: bool = True) -> Lineage | None:
    return Lineage(settings.lineage.url) if enabled else None


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
