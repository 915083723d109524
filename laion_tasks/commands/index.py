"""``laion index``: build the kNN index of a subset (or of every CLIP-scored sample)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from laion_tasks.commands._common import ConfigOption, echo_json, require_snapshot, settings_from, snapshot_option

ALL_SAMPLES = "_all"


def index_inputs(root: str, snapshot: str, subset: str | None) -> tuple[list[str], list[str], list[str] | None]:
    """(embedding URIs, CLIP metadata URIs, subset file URIs or None) for a snapshot."""
    from laion_tasks import layout, storage

    clip_dir = storage.join(root, snapshot, "clip")
    clip_uris = [u for u in storage.list_uris(clip_dir, ".parquet")]
    embedding_uris = [u[: -len(".parquet")] + ".img.npy" for u in clip_uris]
    subset_uris = storage.list_uris(layout.subset_dir(root, snapshot, subset), ".parquet") if subset else None
    return embedding_uris, clip_uris, subset_uris


def register(app: typer.Typer) -> None:
    @app.command("index")
    def index(
        snapshot: str = snapshot_option(),
        subset: Optional[str] = typer.Option(None, help="Curated subset to index (default: every sample with an embedding)."),
        out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Output directory (default: <root>/<snapshot>/index/<subset>)."),
        index_key: Optional[str] = typer.Option(None, help="FAISS index_factory string overriding the automatic choice."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Build a memory-mappable FAISS index + Parquet id->metadata map from the CLIP embeddings."""
        from laion_tasks import layout
        from laion_tasks.stages.index import build_index

        settings = settings_from(config)
        require_snapshot(settings, snapshot)
        root = settings.storage.root
        embedding_uris, clip_uris, subset_uris = index_inputs(root, snapshot, subset)
        if not clip_uris:
            raise typer.BadParameter(f"no CLIP outputs under {root}/{snapshot}/clip: run the clip stage first")
        if subset is not None and not subset_uris:
            raise typer.BadParameter(f"subset {subset!r} has no Parquet files under {layout.subset_dir(root, snapshot, subset)}")
        cfg = settings.index.model_copy(update={"index_key": index_key}) if index_key else settings.index
        dest = out_dir or layout.index_dir(root, snapshot, subset or ALL_SAMPLES)
        echo_json(build_index(embedding_uris, clip_uris, dest, cfg, subset_uris).to_dict())
