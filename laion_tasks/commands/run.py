"""``laion run STAGE...``: any stage through the generic runner (what DAG tasks and GPU pods run).

Without ``--shard`` or ``--batch`` each named stage is planned and run on every shard
of its plan, in the order given; shards whose skip key and output are current are
skipped. ``--dry-run`` prints, per stage, the shards that would run and why nothing else.

A failed shard does not stop its stage: every batch runs, and the report names each
failure at the end. The stages named after a failed one do not run, since they would
read its missing outputs (a stage's plan can read them too, e.g. download regroups
extract's candidates); the report lists them as not run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, List, Optional

import typer

from laion_tasks.commands._common import (
    CliError,
    ConfigOption,
    echo_json,
    require_snapshot,
    settings_from,
    snapshot_option,
)
from laion_tasks.stage import Context

log = logging.getLogger(__name__)


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


def run_stage_batches(ctx: Context, name: str, chosen: dict[str, Any] | None, *, force: bool) -> tuple[Any, dict[str, str]]:
    """Run every batch of one stage, going on past failed ones: (its report, failed shard -> error).

    A plan that cannot be made, or a batch that fails as a whole, is reported under
    ``plan`` or its batch instead of a shard.
    """
    from laion_tasks import runner

    try:
        batches = [chosen] if chosen else runner.plan(ctx, name)
    except Exception as exc:  # noqa: BLE001 - reported with every other failure at the end
        log.error("%s: planning failed: %s", name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        error = f"{type(exc).__name__}: {exc}"
        return {"failed": ["plan"], "errors": {"plan": error}}, {"plan": error}
    results: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for batch in batches:
        try:
            results.append(runner.run_batch(ctx, name, batch, force=force, details=bool(chosen)))
        except runner.BatchError as exc:
            failed.update(exc.failures)
            results.append({**exc.report, "errors": exc.failures})
        except Exception as exc:  # noqa: BLE001 - a batch that fails as a whole (its resources, its report)
            log.error("%s: batch %s failed: %s", name, batch, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            key = f"batch {json.dumps(batch, sort_keys=True)}"
            failed[key] = f"{type(exc).__name__}: {exc}"
            results.append({"failed": [key], "errors": {key: failed[key]}})
    return (results[0] if len(results) == 1 else results), failed


def failure_summary(failures: dict[str, dict[str, str]], report: dict[str, Any], not_run: list[str]) -> str:
    """One line: each failed stage with its failed shards (and the first error), then the stages not run."""
    parts = []
    for name, failed in failures.items():
        batches = report[name] if isinstance(report[name], list) else [report[name]]
        total = sum(int(b.get("done", 0)) + int(b.get("skipped", 0)) for b in batches) + len(failed)
        shard, error = next(iter(failed.items()))
        first = " ".join(error.split())
        first = first if first.startswith(shard) else f"{shard}: {first}"  # the runner's errors start with their shard
        first = first if len(first) <= 300 else first[:297] + "..."
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        parts.append(f"{name} failed on {len(failed)} of {total} shard(s): {first}{more}")
    if not_run:
        parts.append(f"not run: {', '.join(not_run)}")
    return "; ".join(parts)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        stages: List[str] = typer.Argument(..., help="Stage name(s) in order: extract download clip tag dedup_centroids ..."),
        snapshot: str = snapshot_option(),
        shard: Optional[List[str]] = typer.Option(None, "--shard", help="Only these shard ids (repeat or comma-separate)."),
        batch: Optional[str] = typer.Option(None, "--batch", help='A batch descriptor from a plan, e.g. {"start": 0, "stop": 8}.'),
        force: bool = typer.Option(False, "--force/--no-force", help="Run shards even when lineage says they are current."),
        retry_failed_downloads: bool = typer.Option(False, "--retry-failed-downloads", help="download: re-fetch retryable failures."),
        wat_paths_uri: Optional[str] = typer.Option(None, "--wat-paths-uri", help="extract: the crawl's wat.paths(.gz) to plan from."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the shards each stage would run; run nothing."),
        lineage: bool = typer.Option(True, "--lineage/--no-lineage", help="Record runs in lineage and skip current shards."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Run stages through the runner: plan, skip what is current, run and record the rest; report every failure."""
        from laion_tasks import runner

        settings = settings_from(config)
        unknown = [s for s in stages if s not in runner.STAGE_MODULES]
        if unknown:
            raise typer.BadParameter(f"unknown stage(s) {unknown}; stages: {', '.join(runner.STAGE_MODULES)}")
        try:
            chosen = {"shards": split_shard_ids(shard)} if shard else json.loads(batch) if batch else None
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--batch") from None
        require_snapshot(settings, snapshot, may_start="extract" in stages)
        ctx = runner.open_context(
            settings, snapshot, lineage=lineage, retry_failed_downloads=retry_failed_downloads, wat_paths_uri=wat_paths_uri
        )
        report: dict[str, Any] = {}
        failures: dict[str, dict[str, str]] = {}
        not_run: list[str] = []
        try:
            for name in stages:
                if dry_run:
                    ids = runner.batch_shards(ctx, runner.spec(name), chosen) if chosen else None
                    report[name] = {"would_run": runner.pending(ctx, name, ids)}
                elif failures:
                    not_run.append(name)
                    report[name] = {"not_run": f"after the failed stage(s) {', '.join(failures)}"}
                else:
                    report[name], failed = run_stage_batches(ctx, name, chosen, force=force)
                    if failed:
                        failures[name] = failed
        finally:
            ctx.close()
        echo_json(report)
        if failures:
            raise CliError(failure_summary(failures, report, not_run), f"snapshot {snapshot} (every error is in the report above)")
