"""``laion train``: train CLIP on a curated subset with open_clip's own trainer."""

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
    @app.command("train")
    def train(
        subset_dir: Optional[str] = typer.Option(
            None, "--subset-dir", help="Curated subset directory/prefix holding WebDataset .tar shards."
        ),
        subset: Optional[str] = typer.Option(
            None, "--subset", help="With --snapshot instead of --subset-dir: <root>/<snapshot>/subsets/<name>."
        ),
        out: Optional[str] = typer.Option(
            None, "--out", help="Where the checkpoint goes (default with --snapshot: <root>/<snapshot>/models/<subset>)."
        ),
        num_samples: Optional[int] = typer.Option(None, "--num-samples", help="--train-num-samples (default: scanned count)."),
        snapshot: Optional[str] = snapshot_option(required=False, help="Record the run in lineage (stage 'train')."),
        model: Optional[str] = typer.Option(None, "--model", help="Override train.model."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Override train.epochs."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Override train.batch_size."),
        gpus: Optional[int] = typer.Option(None, "--gpus", help="Override train.gpus (torchrun workers when > 1 and CUDA)."),
        force: bool = typer.Option(False, "--force/--no-force", help="Train again although lineage has a done run."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Launch open_clip_train on the subset's shards; write epoch_latest.pt + logs to storage."""
        from laion_tasks import layout, storage
        from laion_tasks.runner import StageRun, run_stage
        from laion_tasks.stages.train import subset_shards, train_clip

        settings = settings_from(config)
        overrides = {"model": model, "epochs": epochs, "batch_size": batch_size, "gpus": gpus}
        train_config = settings.train.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        if (subset_dir is None) == (subset is None) or (subset is not None and snapshot is None):
            raise typer.BadParameter("give --subset-dir, or --subset with --snapshot")
        if snapshot is not None:
            require_snapshot(settings, snapshot)
        if subset_dir is None:
            subset_dir = layout.subset_dir(settings.storage.root, snapshot, layout.check_name(subset, "subset"))  # type: ignore[arg-type]
        subset_name = subset_dir.rstrip("/").rsplit("/", 1)[-1]
        if out is None:
            if snapshot is None:
                raise typer.BadParameter("give --out, or --snapshot to use <root>/<snapshot>/models/<subset>")
            out = storage.join(layout.models_dir(settings.storage.root, snapshot), subset_name)
        shards = subset_shards(subset_dir)
        lineage = lineage_from(settings, enabled=snapshot is not None)
        if lineage is not None and snapshot is not None:
            lineage.ensure_snapshot(snapshot, settings.storage.root)
        from laion_tasks.stages.train import SPEC

        digest = SPEC.config_digest(settings.model_copy(update={"train": train_config}), subset_name)
        stats, skipped = run_stage(
            lineage,
            StageRun(snapshot or "-", "train", subset_name, subset_dir, digest, output_uri=storage.join(out, "epoch_latest.pt")),
            lambda: train_clip(shards, out, train_config, num_samples, run_name=f"{subset_name}-{digest[:8]}"),
            force=force,
            output_exists=storage.exists,
        )
        if skipped or stats is None:
            echo_json({"skipped": True, "reason": "lineage has a done train run with the same config", "out": out})
            return
        echo_json(stats.to_dict())
