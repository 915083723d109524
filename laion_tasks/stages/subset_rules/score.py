"""The CLIP-score percentile rule: an exact snapshot-wide quantile of the chosen scorer."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any


from laion_tasks import storage
from laion_tasks.snapshot_db import SnapshotDB
from laion_tasks.stage import StageError

from laion_tasks.stages.subset_rules.common import _MEMBERS, SIMILARITY, _narrow, _sql_str

log = logging.getLogger(__name__)


# -- the CLIP-score rule --------------------------------------------------------------------


@dataclass
class ScoreThreshold:
    """A snapshot-wide score threshold and what it was computed from."""

    top_pct: float
    threshold: float | None
    """None when no sample of the snapshot has a score (then the rule keeps nothing)."""
    population: int
    source: str
    """``similarity`` or the directory of the scores."""
    models: list[str]
    relation: str
    """SQL of (shard, key, score, model) rows, for narrowing by an external score."""

    def record(self) -> dict[str, Any]:
        return {
            "top_pct": self.top_pct,
            "threshold": self.threshold,
            "population": self.population,
            "score": self.source,
            "models": self.models,
            "quantile": f"exact: quantile_disc(score, {1 - self.top_pct / 100:g}) over every scored sample (DuckDB)",
        }


def _score_relation(db: SnapshotDB, model: str) -> str:
    """(shard, key, score, model) of every sample the chosen score model scored."""
    if model == SIMILARITY:
        return "SELECT shard, key, similarity AS score, clip_model AS model FROM clip"
    directory = model.rstrip("/")
    if storage.is_s3(directory):
        from laion_tasks.snapshot_db import _stage_s3_table

        local = db.work_dir / "scores" / re.sub(r"[^A-Za-z0-9]+", "_", directory)
        if not local.exists():
            _stage_s3_table(directory, local)
    else:
        local = storage.local_path(directory)
    files = sorted(p for p in local.glob("*.parquet") if p.is_file()) if local.is_dir() else []
    if not files:
        raise StageError(f"clip_score_model {model!r}: no <shard>.parquet files (expected 'similarity' or a clip table directory)")
    glob = _sql_str(str(local / "*.parquet"))
    source = f"read_parquet({glob}, filename = true, union_by_name = true)"
    present = {row[0] for row in db.con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    missing = {"key", "similarity"} - present
    if missing:
        raise StageError(f"clip_score_model {model!r}: its parquet lacks column(s) {sorted(missing)} (has {sorted(present)})")
    model_col = "CAST(clip_model AS VARCHAR)" if "clip_model" in present else "NULL::VARCHAR"
    return (f"SELECT regexp_extract(filename, '([^/\\\\]+)\\.parquet$', 1) AS shard, CAST(key AS VARCHAR) AS key, "
            f"CAST(similarity AS DOUBLE) AS score, {model_col} AS model FROM {source}")


def score_threshold(db: SnapshotDB, top_pct: float, model: str = SIMILARITY) -> ScoreThreshold:
    """The score at the snapshot-wide ``1 - top_pct / 100`` quantile (exact, ``quantile_disc``)."""
    relation = _score_relation(db, model)
    q = 1.0 - float(top_pct) / 100.0
    threshold, population, models = db.con.execute(
        f"SELECT quantile_disc(score, {q!r}), count(*), array_agg(DISTINCT model) FILTER (WHERE model IS NOT NULL) "
        f"FROM ({relation}) WHERE score IS NOT NULL"
    ).fetchall()[0]
    return ScoreThreshold(float(top_pct), None if threshold is None else float(threshold), int(population),
                          model, sorted(models or []), relation)


def _narrow_by_score(db: SnapshotDB, table: str, flag: str, score: ScoreThreshold) -> int:
    if score.threshold is None:
        return _narrow(db, table, flag, "false")
    if score.source == SIMILARITY:
        return _narrow(db, table, flag, f"similarity >= {score.threshold!r}")
    db.con.execute(f"CREATE OR REPLACE TEMP TABLE {_MEMBERS} AS SELECT shard || '/' || key AS id FROM "
                   f"({score.relation}) WHERE score >= {score.threshold!r}").fetchall()
    try:
        return _narrow(db, table, flag, f"_shard || '/' || key IN (SELECT id FROM {_MEMBERS})")
    finally:
        db.con.execute(f"DROP TABLE IF EXISTS {_MEMBERS}").fetchall()
