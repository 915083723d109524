"""``laion dedup``: the dedup stage's steps in this process, through the runner (as ``laion run`` runs them)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laion_tasks.commands._common import (
    ConfigOption,
    ForceOption,
    echo_json,
    require_snapshot,
    settings_from,
    snapshot_option,
)


def dedup_steps() -> list[str]:
    """The stages declared with ``dedup`` (centroids, partition, buckets, resolve), in pipeline order."""
    from laion_tasks.stage import STAGE_MODULES

    return [name for name, module in STAGE_MODULES.items() if module == STAGE_MODULES["dedup"]]


def register(app: typer.Typer) -> None:
    @app.command("dedup")
    def dedup(
        snapshot: str = snapshot_option(),
        force: bool = ForceOption,
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Deduplicate every shard of a snapshot's download plan in this process (centroids, partition, buckets, resolve)."""
        from laion_tasks import runner

        settings = settings_from(config)
        require_snapshot(settings, snapshot)
        echo_json(runner.run_all(settings, snapshot, dedup_steps(), force=force))
