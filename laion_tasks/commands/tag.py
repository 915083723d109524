"""``laion tag``, ``laion dedup`` and ``laion langid``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from laion_tasks.commands._common import ConfigOption, echo_json, require_snapshot, settings_from, snapshot_option


def register(app: typer.Typer) -> None:
    @app.command("tag")
    def tag(
        snapshot: str = snapshot_option(),
        shard: Optional[List[str]] = typer.Option(None, "--shard", help="Shard id(s), e.g. 000000; default: every download shard."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Tag shards under <storage.root>/<snapshot>/ (language, punsafe, pwatermark, aesthetics, hash lists)."""
        from laion_tasks import runner
        from laion_tasks.commands.run import split_shard_ids

        settings = settings_from(config)
        require_snapshot(settings, snapshot)
        # the runner, as in the DAG: records lineage and skips shards whose skip key is current
        echo_json(runner.run(settings, snapshot, "tag", {"shards": split_shard_ids(shard)} if shard else None))

    @app.command("dedup")
    def dedup(
        snapshot: str = snapshot_option(),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Deduplicate every shard of a snapshot in this process (centroids, partition, buckets, resolve)."""
        from laion_tasks import layout, storage
        from laion_tasks.stages.dedup import ShardInput, dedup_all

        settings = settings_from(config)
        require_snapshot(settings, snapshot)
        root = settings.storage.root
        images_dir = storage.join(layout.snapshot_root(root, snapshot), "images")
        shard_ids = [Path(u).stem for u in storage.list_uris(images_dir, ".parquet")]
        if not shard_ids:
            raise typer.BadParameter(f"no download parquet under {images_dir}")
        inputs = []
        for shard in shard_ids:
            clip = layout.clip_parquet_uri(root, snapshot, shard)
            emb = layout.clip_image_emb_uri(root, snapshot, shard)
            has_clip = storage.exists(clip) and storage.exists(emb)
            tags = layout.tags_parquet_uri(root, snapshot, shard)
            inputs.append(ShardInput(shard, layout.images_parquet_uri(root, snapshot, shard), clip if has_clip else None,
                                     emb if has_clip else None, tags if storage.exists(tags) else None))
        work = storage.join(layout.snapshot_root(root, snapshot), "dedup_work")
        stats = dedup_all(inputs, work, layout.dedup_dir(root, snapshot), settings.dedup, settings.clip)
        echo_json(stats.to_dict())

    @app.command("langid")
    def langid(
        texts: List[str] = typer.Argument(..., help="Texts to identify."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Language, confidence, deciding model and en/multi/nolang group of each text."""
        from laion_tasks.langid import detect_languages, language_group

        settings = settings_from(config)
        options = settings.tag.langid()
        detections = detect_languages(texts, options)
        echo_json(
            [
                {"text": t, "language": d.language, "confidence": round(d.confidence, 4), "model": d.source,
                 "group": language_group(d, options.threshold)}
                for t, d in zip(texts, detections)
            ]
        )
