"""``laion curate`` (write subsets) and ``laion card`` (write the dataset card)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laion_tasks.commands._common import (
    ConfigOption,
    echo_json,
    lineage_from,
    require_snapshot,
    settings_from,
    snapshot_option,
)


def register(app: typer.Typer) -> None:
    @app.command("curate")
    def curate(
        snapshot: str = snapshot_option(),
        subset: Optional[list[str]] = typer.Option(None, "--subset", help="Subset name (repeatable); default: all configured."),
        config: Optional[Path] = ConfigOption,
        root: Optional[str] = typer.Option(None, "--root", help="Storage root (default: storage.root)."),
        lineage: bool = typer.Option(True, "--lineage/--no-lineage", help="Record runs in lineage and skip done subsets."),
        force: bool = typer.Option(False, "--force", help="Re-write subsets that lineage says are done."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Only count what each subset would hold; write nothing."),
    ) -> None:
        """Evaluate the configured subset predicates over a snapshot and write each subset (Parquet, optional WebDataset)."""
        from laion_tasks import runner
        from laion_tasks.stages.curate import subset_counts

        settings = settings_from(config)
        if root:
            settings = settings.model_copy(update={"storage": settings.storage.model_copy(update={"root": root})})
        names = subset or list(settings.curate.subsets)
        unknown = [n for n in names if n not in settings.curate.subsets]
        if unknown:
            raise typer.BadParameter(f"unknown subset(s) {unknown}; configured: {sorted(settings.curate.subsets)}")
        require_snapshot(settings, snapshot)
        if dry_run:
            counts = subset_counts(settings.storage.root, snapshot, settings.curate, clip=settings.clip)
            echo_json({n: {"outcomes": counts.outcomes(n), "unavailable": counts.unavailable.get(n)} for n in names})
            return
        report = runner.run(settings, snapshot, "curate", {"shards": names}, force=force, details=True, lineage=lineage)
        echo_json(report["shards"])  # per subset: its stats, or {"skipped": true} when current

    @app.command("card")
    def card(
        snapshot: str = snapshot_option(),
        config: Optional[Path] = ConfigOption,
        root: Optional[str] = typer.Option(None, "--root", help="Storage root (default: storage.root)."),
        out: Optional[str] = typer.Option(None, "--out", help="Card directory (default: <root>/<snapshot>/card)."),
        lineage: bool = typer.Option(True, "--lineage/--no-lineage", help="Take the WAT -> candidates funnel from lineage."),
    ) -> None:
        """Write the dataset card (README.md + PNG charts) of a snapshot and a README per subset."""
        from laion_tasks.card import write_dataset_card

        settings = settings_from(config)
        if root:
            settings = settings.model_copy(update={"storage": settings.storage.model_copy(update={"root": root})})
        require_snapshot(settings, snapshot)
        root = settings.storage.root
        uri = write_dataset_card(root, snapshot, lineage_from(settings, lineage), None, out, config=settings.curate,
                                 clip=settings.clip)
        typer.echo(uri)
