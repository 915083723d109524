"""``laion clip`` (one shard on named files) and ``laion clip-shard`` (= ``laion run clip --shard ...``).

Both are the clip stage's own run through the runner. The shard-addressed form records lineage
itself, so a Kubernetes pod reports its results to the lineage database and object storage
directly; nothing goes through XCom.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from laion_tasks.commands._common import (
    ConfigOption,
    ForceOption,
    echo_json,
    require_snapshot,
    settings_for_files,
    settings_from,
    shard_of,
    snapshot_option,
)


def register(app: typer.Typer) -> None:
    @app.command("clip")
    def clip(
        images_parquet: str = typer.Option(..., "--images-parquet", help="Download shard parquet (all samples)."),
        tar: str = typer.Option(..., "--tar", help="Download shard WebDataset tar."),
        out_parquet: str = typer.Option(..., "--out-parquet", help="Output parquet (one row per input row)."),
        img_emb: str = typer.Option(..., "--img-emb", help="Output fp16 image embeddings (.npy)."),
        txt_emb: str = typer.Option(..., "--txt-emb", help="Output fp16 text embeddings (.npy)."),
        snapshot: Optional[str] = snapshot_option(
            required=False, help="Record the run in lineage under this snapshot (a re-run with the same files and knobs is skipped)."
        ),
        force: bool = ForceOption,
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Score one download shard with CLIP: similarity, kept/filtered status and fp16 embeddings."""
        from laion_tasks import runner

        settings = settings_for_files(config, snapshot)
        shard = shard_of(images_parquet)
        stats = runner.run_on_files(
            settings, snapshot, "clip", shard, inputs={"images_parquet": images_parquet, "tar": tar},
            outputs={"out_parquet": out_parquet, "img_emb": img_emb, "txt_emb": txt_emb}, force=force,
        )  # fmt: skip
        echo_json(stats)

    @app.command("clip-shard")
    def clip_shard(
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
        echo_json(runner.run(settings, snapshot, "clip", {"shards": shard_ids}, force=force, lineage=lineage))
