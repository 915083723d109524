"""``laion tag`` and ``laion langid``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from laion_tasks.commands._common import (
    ConfigOption,
    echo_json,
    require_snapshot,
    settings_from,
    snapshot_option,
)


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

    @app.command("langid")
    def langid(
        texts: List[str] = typer.Argument(..., help="Texts to identify."),
        config: Optional[Path] = ConfigOption,
    ) -> None:
        """Language, confidence, deciding model and en/multi/nolang group of each text."""
        from laion_tasks.langid import detect_languages, language_group

        settings = settings_from(config)
        options = settings.langid.options()
        detections = detect_languages(texts, options)
        echo_json(
            [
                {"text": t, "language": d.language, "confidence": round(d.confidence, 4), "model": d.source,
                 "group": language_group(d, options.threshold)}
                for t, d in zip(texts, detections)
            ]
        )
