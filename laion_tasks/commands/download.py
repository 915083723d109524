"""``laion regroup`` and ``laion download``: the download stage on the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from laion_tasks.commands._common import ConfigOption, settings_from


def register(app: typer.Typer) -> None:
    @app.command("regroup")
    def regroup(
        candidates: List[str] = typer.Argument(..., help="Candidate Parquet URIs, or one directory/prefix holding them."),
        shards_dir: str = typer.Option(..., "--shards-dir", help="Where to write <000000>.parquet download shards."),
        shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Rows per shard (default: download.shard_size)."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Cut extract's candidates into fixed-size download shards (deterministic)."""
        from laion_tasks import storage
        from laion_tasks.stages.regroup import make_download_shards

        settings = settings_from(config)
        uris = list(candidates)
        if len(uris) == 1 and not uris[0].endswith(".parquet"):
            uris = storage.list_uris(uris[0], ".parquet")
        if not uris:
            raise typer.BadParameter(f"no candidate .parquet files in {candidates}")
        shards = make_download_shards(uris, shards_dir, shard_size or settings.download.shard_size)
        typer.echo(json.dumps({"shards": len(shards), "first": shards[0] if shards else None}))

    @app.command("download")
    def download(
        shard_uri: str = typer.Argument(..., help="Download shard Parquet (from `laion regroup`)."),
        tar_uri: str = typer.Argument(..., help="Output WebDataset tar."),
        parquet_uri: str = typer.Argument(..., help="Output Parquet with a status for every sample."),
        retry_failed: bool = typer.Option(False, "--retry-failed", help="Re-download only retryable failures of a finished shard."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Download the images of one shard; prints the counts by status as JSON."""
        from laion_tasks.stages import download as stage

        settings = settings_from(config)
        run = stage.retry_failed if retry_failed else stage.download_shard
        stats = run(shard_uri, tar_uri, parquet_uri, settings.download)
        typer.echo(json.dumps(stats.to_dict(), sort_keys=True))
