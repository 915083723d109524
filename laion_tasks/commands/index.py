"""``laion index``: build the kNN index of a subset (or of every CLIP-scored sample), through the runner."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laion_tasks.commands._common import (
    CliError,
    ConfigOption,
    ForceOption,
    echo_json,
    require_snapshot,
    settings_from,
    snapshot_option,
)


def register(app: typer.Typer) -> None:
    @app.command("index")
    def index(
        snapshot: str = snapshot_option(),
        subset: Optional[str] = typer.Option(None, help="Curated subset to index (default: every sample with an embedding)."),
        out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Output directory (default: <root>/<snapshot>/index/<subset>)."),
        index_key: Optional[str] = typer.Option(None, help="FAISS index_factory string overriding the automatic choice."),
        force: bool = ForceOption,
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Build a memory-mappable FAISS index + Parquet id->metadata map from the CLIP embeddings."""
        from laion_tasks import layout, runner, storage
        from laion_tasks.stages.index import ALL_SAMPLES

        settings = settings_from(config)
        require_snapshot(settings, snapshot)
        root = settings.storage.root
        if subset is not None:
            layout.check_name(subset, "subset")
            if not storage.list_uris(layout.subset_dir(root, snapshot, subset), ".parquet"):
                raise CliError(f"subset {subset!r} has no Parquet files under {layout.subset_dir(root, snapshot, subset)}", "--subset")
        if index_key:
            settings = settings.model_copy(update={"index": settings.index.model_copy(update={"index_key": index_key})})
        shard = subset or ALL_SAMPLES
        report = runner.run(settings, snapshot, "index", {"shards": [shard]}, force=force, details=True,
                            outputs={"index_dir": out_dir} if out_dir else None)
        echo_json(report["shards"][shard])
