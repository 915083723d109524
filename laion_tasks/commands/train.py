"""``laion train``: train CLIP on a curated subset with open_clip's own trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laion_tasks.commands._common import (
    ConfigOption,
    echo_json,
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
        from laion_tasks import layout, runner, storage
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
            out = layout.model_dir(settings.storage.root, snapshot, subset_name)
        shards = subset_shards(subset_dir)
        settings = settings.model_copy(update={"train": train_config})
        digest = runner.spec("train").config_digest(settings, subset_name)
        # the subset's shards by size (curate rewrites them), and the sample count asked for
        identity = [f"subset:{subset_dir}", *(f"{u}:{storage.size(u)}" for u in shards), f"num_samples:{num_samples}"]
        stats, skipped = runner.run_one(
            settings, snapshot, "train", subset_name,
            lambda: train_clip(shards, out, train_config, num_samples, run_name=f"{subset_name}-{digest[:8]}"),
            input_uri=subset_dir, output_uri=layout.checkpoint_uri(out),
            identity=identity if snapshot is not None else (), force=force,
        )  # fmt: skip
        if skipped or stats is None:
            echo_json({"skipped": True, "reason": "lineage has a done train run with the same config", "out": out})
            return
        echo_json(stats.to_dict())
