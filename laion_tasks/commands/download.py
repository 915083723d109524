"""``laion regroup`` and ``laion download``: the download stage on named files, through the runner.

``laion download`` is the stage's own run (the runner's, as in ``laion run download``): the
hash lists block URLs and images here as they do in the DAG.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from laion_tasks.commands._common import (
    CliError,
    ConfigOption,
    ForceOption,
    echo_json,
    settings_for_files,
    settings_from,
    shard_of,
    snapshot_option,
)


def register(app: typer.Typer) -> None:
    @app.command("regroup")
    def regroup(
        candidates: List[str] = typer.Argument(..., help="Candidate Parquet URIs, or one directory/prefix holding them."),
        shards_dir: str = typer.Option(..., "--shards-dir", help="Where to write <000000>.parquet download shards."),
        shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Rows per shard (default: download.shard_size)."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Cut extract's candidates into fixed-size download shards (deterministic); the plan goes to <shards-dir>/manifest.json."""
        from laion_tasks import runner, storage

        settings = settings_from(config)
        uris = list(candidates)
        if len(uris) == 1 and not uris[0].endswith(".parquet"):
            uris = storage.list_uris(uris[0], ".parquet")
        if not uris:
            raise CliError(f"no candidate .parquet files in {', '.join(candidates)}", "CANDIDATES")
        missing = [u for u in uris if not storage.exists(u)]
        if missing:
            raise CliError(f"candidate file {missing[0]} does not exist", "CANDIDATES")
        if shard_size is not None:
            settings = settings.model_copy(update={"download": settings.download.model_copy(update={"shard_size": shard_size})})
        shards = runner.plan_only(
            settings, None, "download", candidate_uris=uris,
            outputs={"shards_dir": shards_dir, "shards_manifest": storage.join(shards_dir, "manifest.json")},
        )  # fmt: skip
        first = storage.join(shards_dir, f"{shards[0]}.parquet") if shards else None
        echo_json({"shards": len(shards), "first": first})

    @app.command("download")
    def download(
        shard_uri: str = typer.Argument(..., help="Download shard Parquet (from `laion regroup`)."),
        tar_uri: str = typer.Argument(..., help="Output WebDataset tar."),
        parquet_uri: str = typer.Argument(..., help="Output Parquet with a status for every sample."),
        retry_failed: bool = typer.Option(False, "--retry-failed", help="Re-download only retryable failures of a finished shard."),
        snapshot: Optional[str] = snapshot_option(
            required=False, help="Record the run in lineage under this snapshot (a re-run with the same shard and knobs is skipped)."
        ),
        force: bool = ForceOption,
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Download the images of one shard (hash lists and opt-outs honoured); prints the counts by status as JSON."""
        from laion_tasks import runner

        settings = settings_for_files(config, snapshot)
        shard = shard_of(shard_uri)
        stats = runner.run_on_files(
            settings, snapshot, "download", shard, inputs={"shard": shard_uri},
            outputs={"tar": tar_uri, "parquet": parquet_uri}, force=force, retry_failed_downloads=retry_failed,
        )  # fmt: skip
        echo_json(stats)
