"""``laion extract`` and ``laion list-wats``: the extract stage from the shell."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laion_tasks.commands._common import (
    ConfigOption,
    ForceOption,
    echo_json,
    settings_for_files,
    settings_from,
    snapshot_option,
)

RECORD_HELP = "Record the run in lineage under this snapshot (a re-run with the same file and knobs is skipped)."


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract(
        wat_uri: str = typer.Argument(..., help="WAT file: local path, s3://... or https://..., gzipped or plain."),
        output_uri: str = typer.Argument(..., help="Parquet shard to write (local path or s3://...)."),
        snapshot: Optional[str] = snapshot_option(required=False, help=RECORD_HELP),
        force: bool = ForceOption,
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Extract (image URL, alt text) candidates of one WAT file; prints the shard stats as JSON."""
        from laion_tasks import layout, runner

        settings = settings_for_files(config, snapshot, may_start=True)
        stats = runner.run_on_files(settings, snapshot, "extract", layout.wat_id(wat_uri), inputs={"wat": wat_uri},
                                    outputs={"candidates": output_uri}, force=force)
        echo_json(stats)

    @app.command("list-wats")
    def list_wats(
        snapshot: str = snapshot_option(help="The crawl to list, e.g. CC-MAIN-2024-10 (nothing is created for it)."),
        paths_uri: Optional[str] = typer.Option(
            None, "--paths-uri", help="wat.paths(.gz) to read instead of <cc_base_url>crawl-data/<crawl>/wat.paths.gz."
        ),
        max_files: Optional[int] = typer.Option(None, "--max", min=1, help="Keep only the first N WAT files."),
        sample: Optional[int] = typer.Option(None, "--sample", min=1, help="Deterministic sample of N WAT files."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Print the WAT file URIs of a crawl, one per line."""
        from laion_tasks.stages.extract import list_wat_files

        settings = settings_from(config)
        extract_config = settings.extract
        if max_files is not None:
            extract_config = extract_config.model_copy(update={"max_wat_files": max_files})
        if sample is not None:
            extract_config = extract_config.model_copy(update={"sample_wat_files": sample})
        for uri in list_wat_files(snapshot, extract_config, paths_uri=paths_uri):
            typer.echo(uri)
