"""``laion clip-score`` (explicit URIs) and ``laion clip-score-shard`` (layout-addressed, used by GPU pods).

The shard-addressed form records lineage itself, so a Kubernetes pod reports its
results to the lineage database and object storage directly; nothing goes through XCom.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

from laion_tasks.commands._common import ConfigOption, echo_json, settings_from


def split_shard_ids(values: list[str]) -> list[str]:
    """``--shard a --shard b,c`` and a templated ``"a, b c"`` all mean [a, b, c] (order kept, no repeats)."""
    out: list[str] = []
    for value in values:
        for part in re.split(r"[,\s]+", value.strip().strip("[]")):
            part = part.strip().strip("'\"")
            if part and part not in out:
                out.append(part)
    return out


def register(app: typer.Typer) -> None:
    @app.command("clip-score")
    def clip_score(
        images_parquet: str = typer.Option(..., "--images-parquet", help="Download shard parquet (all samples)."),
        tar: str = typer.Option(..., "--tar", help="Download shard WebDataset tar."),
        out_parquet: str = typer.Option(..., "--out-parquet", help="Output parquet (one row per input row)."),
        img_emb: str = typer.Option(..., "--img-emb", help="Output fp16 image embeddings (.npy)."),
        txt_emb: str = typer.Option(..., "--txt-emb", help="Output fp16 text embeddings (.npy)."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Score one download shard with CLIP: similarity, kept/filtered status and fp16 embeddings."""
        from laion_tasks.stages.clip_score import clip_score_shard

        settings = settings_from(config)
        stats = clip_score_shard(
            images_parquet, tar, out_parquet, img_emb, txt_emb, settings.clip,
            language_threshold=settings.tag.language_threshold,
            langid_model_path=settings.tag.langid_model_path,
        )
        echo_json(stats.to_dict())

    @app.command("clip-score-shard")
    def clip_score_shard_cmd(
        snapshot: str = typer.Option(..., "--snapshot", help="Snapshot id, e.g. CC-MAIN-2024-10."),
        shard: List[str] = typer.Option(..., "--shard", help="Shard id(s); repeat or separate with commas."),
        config: Optional[Path] = ConfigOption,
        force: bool = typer.Option(False, "--force/--no-force", help="Re-run shards that lineage says are done."),
        lineage: bool = typer.Option(True, "--lineage/--no-lineage", help="Record the runs in the lineage database."),
    ) -> None:
        """Score shards found by snapshot + shard id under storage.root, recording lineage (what GPU pods run)."""
        from laion_tasks import layout, pipeline, storage
        from laion_tasks.commands._common import lineage_from
        from laion_tasks.lineage import StageRun, run_stage
        from laion_tasks.stages.clip_score import clip_config_digest

        settings = settings_from(config)
        root = settings.storage.root
        shard_ids = split_shard_ids(shard)
        if not shard_ids:
            raise typer.BadParameter("no shard ids given", param_hint="--shard")
        db = lineage_from(settings, lineage)
        if db is not None:
            db.ensure_snapshot(snapshot, layout.snapshot_root(root, snapshot))
        digest = clip_config_digest(settings)
        score = pipeline.clip_shard_call(settings, snapshot)
        results = {}
        for shard_id in shard_ids:
            stats, skipped = run_stage(
                db,
                StageRun(snapshot, "clip", shard_id, layout.images_parquet_uri(root, snapshot, shard_id), digest),
                lambda shard_id=shard_id: score(shard_id),
                force=force,
                output_exists=storage.exists,
            )
            results[shard_id] = {"skipped": True} if skipped else stats.to_dict()  # type: ignore[union-attr]
        echo_json(results)
