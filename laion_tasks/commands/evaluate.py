"""``laion eval zeroshot``: zero-shot classification with CLIP_benchmark's protocol."""

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

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate CLIP models (zero-shot classification).")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


@eval_app.command("zeroshot")
def zeroshot(
    model: str = typer.Option(..., "--model", help="open_clip model name, e.g. ViT-B-32 or laion-tiny-clip."),
    dataset: str = typer.Option(
        ..., "--dataset", help="ImageFolder dir, flat dir with labels.tsv, or WebDataset shards (a.tar, {0..9}.tar, s3:// prefix)."
    ),
    out: str = typer.Option(..., "--out", help="Directory/prefix for zeroshot.json, zeroshot.md, predictions.parquet."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="open_clip pretrained tag (downloads weights)."),
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", help="Checkpoint file or directory (laion train output, open_clip_train epoch_*.pt); local or s3://."
    ),
    classnames: Optional[str] = typer.Option(
        None, "--classnames", help="JSON list of class names, or file.json#dataset (default: the dataset's own)."
    ),
    templates: Optional[str] = typer.Option(
        None, "--templates", help="JSON list of templates with {c}, or file.json#dataset (default: OpenAI's 80 ImageNet templates)."
    ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda[:N]"),
    seed: int = typer.Option(0, "--seed", help="Init seed when neither weights nor checkpoint are given (tiny models)."),
    snapshot: Optional[str] = snapshot_option(required=False, help="Record the run in lineage under this snapshot (stage 'eval')."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Classify every image against class-name prompts; print the metrics, write JSON + Markdown reports."""
    from laion_tasks import runner, storage
    from laion_tasks.models.clip import load_clip
    from laion_tasks.stages.evaluate import evaluate_zeroshot

    settings = settings_from(config)
    if snapshot is not None:
        require_snapshot(settings, snapshot)
    eval_config = settings.eval.model_copy(
        update={k: v for k, v in {"batch_size": batch_size, "device": device}.items() if v is not None}
    )

    def run():  # noqa: ANN202
        if checkpoint and (storage.is_s3(checkpoint) or storage.is_http(checkpoint)):
            with storage.local_copy(checkpoint) as local:
                clip = load_clip(model, pretrained, str(local), eval_config.device, seed)
        else:
            clip = load_clip(model, pretrained, checkpoint, eval_config.device, seed)
        return evaluate_zeroshot(clip, dataset, out, eval_config, classnames, templates)

    # the stage's knobs (with this command's overrides), and what the options name: model, data, prompts, seed
    identity = [f"{k}:{v}" for k, v in {"model": model, "pretrained": pretrained, "checkpoint": checkpoint, "dataset": dataset,
                                        "classnames": classnames, "templates": templates, "seed": seed}.items()]
    stats, skipped = runner.run_one(
        settings.model_copy(update={"eval": eval_config}), snapshot, "eval", dataset.rstrip("/").rsplit("/", 1)[-1], run,
        input_uri=dataset, output_uri=storage.join(out, "zeroshot.json"), identity=identity,
    )  # fmt: skip
    if skipped or stats is None:
        echo_json({"skipped": True, "reason": "lineage has a done eval with the same model, data and config", "out": out})
        return
    echo_json({"out": out, **stats.to_dict()})
