"""``laion run STAGE...``: any stage through the generic runner (what DAG tasks and GPU pods run).

Without ``--shard`` or ``--batch`` each named stage is planned and run on every shard
of its plan, in the order given; shards whose skip key and output are current are
skipped. ``--dry-run`` prints, per stage, the shards that would run and why nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from laion_tasks.commands._common import ConfigOption, echo_json, settings_from


def split_shard_ids(values: list[str]) -> list[str]:
    """``--shard a --shard b,c`` and a templated ``"a, b c"`` all mean [a, b, c] (order kept, no repeats)."""
    import re

    out: list[str] = []
    for value in values:
        for part in re.split(r"[,\s]+", value.strip().strip("[]")):
            part = part.strip().strip("'\"")
            if part and part not in out:
                out.append(part)
    return out


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        stages: List[str] = typer.Argument(..., help="Stage name(s) in order: extract download clip tag dedup_centroids ..."),
        snapshot: str = typer.Option(..., "--snapshot", "-s", help="Snapshot id, e.g. CC-MAIN-2024-10."),
        shard: Optional[List[str]] = typer.Option(None, "--shard", help="Only these shard ids (repeat or comma-separate)."),
        batch: Optional[str] = typer.Option(None, "--batch", help='A batch descriptor from a plan, e.g. {"start": 0, "stop": 8}.'),
        force: bool = typer.Option(False, "--force/--no-force", help="Run shards even when lineage says they are current."),
        retry_failed_downloads: bool = typer.Option(False, "--retry-failed-downloads", help="download: re-fetch retryable failures."),
        wat_paths_uri: Optional[str] = typer.Option(None, "--wat-paths-uri", help="extract: the crawl's wat.paths(.gz) to plan from."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the shards each stage would run; run nothing."),
        lineage: bool = typer.Option(True, "--lineage/--no-lineage", help="Record runs in lineage and skip current shards."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Run stages through the runner: plan, skip what is current, run and record the rest."""
        from laion_tasks import runner

        settings = settings_from(config)
        unknown = [s for s in stages if s not in runner.STAGE_MODULES]
        if unknown:
            raise typer.BadParameter(f"unknown stage(s) {unknown}; stages: {', '.join(runner.STAGE_MODULES)}")
        ctx = runner.open_context(
            settings, snapshot, lineage=lineage, retry_failed_downloads=retry_failed_downloads, wat_paths_uri=wat_paths_uri
        )
        chosen = {"shards": split_shard_ids(shard)} if shard else json.loads(batch) if batch else None
        report: dict[str, object] = {}
        try:
            for name in stages:
                if dry_run:
                    ids = runner.batch_shards(ctx, runner.spec(name), chosen) if chosen else None
                    report[name] = {"would_run": runner.pending(ctx, name, ids)}
                    continue
                batches = [chosen] if chosen else runner.plan(ctx, name)
                results = [runner.run_batch(ctx, name, b, force=force, details=bool(chosen)) for b in batches]
                report[name] = results[0] if len(results) == 1 else results
        except runner.BatchError as exc:
            echo_json(report)
            typer.echo(str(exc), err=True)
            raise typer.Exit(1) from exc
        finally:
            ctx.close()
        echo_json(report)
