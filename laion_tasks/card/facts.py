"""The card's facts: aggregates of the snapshot's Parquet (DuckDB GROUP BY queries), samples for the
grids, what each subset holds, and the lineage sections."""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

from laion_tasks import layout, storage
from laion_tasks.config import CurateConfig, SubsetConfig
from laion_tasks.lineage import FunnelRow
from laion_tasks.snapshot_db import SAMPLES_VIEW, SnapshotDB
from laion_tasks.stage import ShardStats
from laion_tasks.wds import iter_samples
from laion_tasks.stages.curate import (
    SubsetCounts,
    base_outcome_sql,
)

from laion_tasks.wds import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


# Unknown is not safe: a null score (tag never ran, or could not score the image) keeps it off the card.
SAFE_FOR_CARD = (
    "NOT coalesce(hashlist_blocked, false) AND nsfw_text IS NOT NULL AND NOT nsfw_text "
    "AND punsafe IS NOT NULL AND punsafe < 0.5"
)
PASS_OUTCOMES = ("kept", "success")
BASE_LABELS = {
    "drop:not_downloaded": "download failed",
    "drop:not_clip_scored": "not CLIP-scored (no image, decode error, empty caption)",
    "drop:clip_filtered": "below the CLIP similarity threshold",
    "drop:hashlist_blocked": "on a URL / image hash list",
    "drop:duplicate": "duplicate of another sample",
}


@dataclass
class SubsetInfo:
    name: str
    where: str
    description: str
    state: str
    """ok | unavailable | not written (counts computed now, no files yet)."""
    reason: str | None
    rows: int
    outcomes: dict[str, int]
    files: list[dict[str, Any]] = field(default_factory=list)
    webdataset: dict[str, Any] | None = None
    note: str | None = None
    rules: dict[str, Any] = field(default_factory=dict)
    """What the subset's DataComp rules decided (threshold and model, clusters hit, classes)."""


# -- queries ---------------------------------------------------------------------


def _rows(db: SnapshotDB, sql: str) -> list[tuple[Any, ...]]:
    return db.con.execute(sql).fetchall()


def _similarity_hist(db: SnapshotDB, where: str = "true") -> list[tuple[float, bool, int]]:
    """(bucket start, kept by CLIP, count) in 0.01 buckets."""
    return [
        (b / 100.0, bool(k), int(n))
        for b, k, n in _rows(
            db,
            f"SELECT floor(similarity * 100)::INTEGER AS b, coalesce(clip_kept, false) AS k, count(*) "
            f"FROM {SAMPLES_VIEW} WHERE similarity IS NOT NULL AND ({where}) GROUP BY ALL ORDER BY b, k",
        )
    ]


def _size_hist(db: SnapshotDB, column: str) -> list[tuple[int, int]]:
    """(log2 bucket, count) of an original image dimension over downloaded samples."""
    return [
        (int(b), int(n))
        for b, n in _rows(
            db,
            f"SELECT floor(log2(greatest({column}, 1)))::INTEGER AS b, count(*) FROM {SAMPLES_VIEW} "
            f"WHERE status = 'success' AND {column} IS NOT NULL GROUP BY b ORDER BY b",
        )
    ]


def _shares(db: SnapshotDB, column: str, limit: int = 15) -> list[tuple[str, int]]:
    rows = _rows(
        db,
        f"SELECT coalesce({column}, '(none)') AS v, count(*) AS n FROM {SAMPLES_VIEW} "
        f"WHERE similarity IS NOT NULL GROUP BY v ORDER BY n DESC, v",
    )
    top = [(str(v), int(n)) for v, n in rows[:limit]]
    rest = sum(int(n) for _, n in rows[limit:])
    return top + ([("other", rest)] if rest else [])


def _status_counts(db: SnapshotDB) -> list[tuple[str, int]]:
    return [(str(s), int(n)) for s, n in _rows(db, f"SELECT coalesce(status, '(none)'), count(*) FROM {SAMPLES_VIEW} GROUP BY 1 ORDER BY 2 DESC, 1")]


def _sample_rows(db: SnapshotDB, where: str, limit: int, config: CurateConfig) -> list[dict[str, Any]]:
    """A deterministic spread of samples (ordered by md5 of the key), safe to publish."""
    rows = _rows(
        db,
        f"SELECT shard, key, caption, similarity, base_outcome FROM "
        f"(SELECT *, {base_outcome_sql(config)} AS base_outcome FROM {SAMPLES_VIEW}) "
        f"WHERE status = 'success' AND {SAFE_FOR_CARD} AND ({where}) ORDER BY md5(key) LIMIT {int(limit)}",
    )
    return [dict(zip(("shard", "key", "caption", "similarity", "outcome"), r)) for r in rows]


def _thumbnails(db: SnapshotDB, samples: list[dict[str, Any]], size: int = 128) -> dict[str, Any]:
    """Decode the chosen samples' images from their download tars (streamed, one pass per shard)."""
    from PIL import Image

    by_shard: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        by_shard[s["shard"]].add(s["key"])
    out: dict[str, Any] = {}
    for shard, keys in sorted(by_shard.items()):
        uri = layout.images_tar_uri(db.root, db.snapshot, shard)
        try:
            with storage.open_read(uri) as handle:
                for key, members in iter_samples(handle, keys):
                    for info, data in members:
                        if info.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                            try:
                                img = Image.open(io.BytesIO(data))
                                img = img.convert("RGB")
                                img.thumbnail((size, size))
                                out[key] = img
                            except Exception as exc:  # noqa: BLE001 - a bad image just has no thumbnail
                                log.warning("card: %s in %s does not decode: %s", info.name, uri, exc)
                            break
        except Exception as exc:  # noqa: BLE001 - the card still renders without these thumbnails
            log.warning("card: cannot read %s for thumbnails: %s", uri, exc)
    return out



# -- subsets ----------------------------------------------------------------------


def _subset_info(
    name: str,
    subset: SubsetConfig | None,
    stats: ShardStats | None,
    manifest: dict[str, Any] | None,
    counts: SubsetCounts,
) -> SubsetInfo:
    where = subset.where if subset else (manifest or {}).get("where", "")
    description = subset.description if subset else (manifest or {}).get("description", "")
    computed = counts.outcomes(name) if subset else {}
    if manifest is not None:
        info = SubsetInfo(
            name, where, description, manifest["status"], manifest.get("reason"), int(manifest.get("rows", 0)),
            dict(manifest.get("counts", {})), manifest.get("parquet", []), manifest.get("webdataset"),
        )
    elif stats is not None:
        extra = stats.extra or {}
        info = SubsetInfo(
            name, where, description, str(extra.get("status", "ok")), extra.get("reason"),
            int(stats.counts.get("kept", 0)), dict(stats.counts),
        )
    else:
        state = "unavailable" if name in counts.unavailable else "not written"
        info = SubsetInfo(
            name, where, description, state, counts.unavailable.get(name), computed.get("kept", 0), computed
        )
    info.rules = (manifest or {}).get("rules") or counts.rules.get(name, {})
    if stats is not None and manifest is not None and dict(stats.counts) != info.outcomes:
        info.note = f"the run's counts {dict(stats.counts)} differ from the manifest {info.outcomes}"
    if subset is not None and info.outcomes and computed and info.outcomes != computed:
        info.note = (
            f"the data changed since this subset was written: it holds {info.rows} rows, "
            f"the predicate now matches {computed.get('kept', 0)}; re-run `laion curate`"
        )
    return info



def _lineage_sections(rows: list[FunnelRow]) -> dict[str, dict[str, int]]:
    stages: dict[str, dict[str, int]] = {}
    for r in rows:
        stages.setdefault(r.stage, {})[r.outcome] = r.count
    return stages


def _passed(outcomes: Mapping[str, int]) -> int:
    return sum(v for k, v in outcomes.items() if k in PASS_OUTCOMES)
