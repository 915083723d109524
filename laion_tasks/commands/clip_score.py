"""``laion clip-score`` (explicit URIs) and ``laion clip-score-shard`` (= ``laion run clip --shard ...``).

The shard-addressed form goes through the runner and records lineage itself, so a
Kubernetes pod reports its results to the lineage database and object storage directly;
nothing goes through XCom.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from laion_tasks.commands._common import ConfigOption, echo_json, require_snapshot, settings_from, snapshot_option


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
        from laion_tasks.stages.clip.encode import score_with_settings

        settings = settings_from(config)
        echo_json(score_with_settings(settings, images_parquet, tar, out_parquet, img_emb, txt_emb).to_dict())

    @app.command("clip-score-shard")
    def clip_score_shard_cmd(
        snapshot: str = snapshot_option(),
        shard: List[str] = typer.Option(..., "--shard", help="Shard id(s); repeat or separate with commas."),
        config: Optional[Path] = ConfigOption,
        force: bool = typer.Option(False, "--force/--no-force", help="Re-run shards that lineage says are done."),
        lineage: bool = typer.Option(True, "--lineage/--no-lineage", help="Record the runs in the lineage database."),
    ) -> None:
        """Score shards found by snapshot + shard id under storage.root, recording lineage (= ``laion run clip``)."""
        from laion_tasks import runner
        from laion_tasks.commands.run import split_shard_ids

        settings = settings_from(config)
        shard_ids = split_shard_ids(shard)
        if not shard_ids:
            raise typer.BadParameter("no shard ids given", param_hint="--shard")
        require_snapshot(settings, snapshot)
        ctx = runner.open_context(settings, snapshot, lineage=lineage)
        try:
            report = runner.run_batch(ctx, "clip", {"shards": shard_ids}, force=force)
        finally:
            ctx.close()
        echo_json(report)
