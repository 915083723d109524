"""Subset rules beyond a SQL predicate: DataComp's three filters, inside curate's one scan.

DataComp (Gadre et al. 2023; ImageNet zero-shot in open_clip's ``docs/datacomp_models.md``) showed
that these filters beat LAION's fixed CLIP threshold. A subset switches each one on in its config
(:class:`~laion_tasks.config.SubsetConfig`); set ones combine as an intersection:

* **text** (``text_classes``, ``text_languages``): the caption's language is in the list (checked
  first, as DataComp filters English first), then the caption contains one of the class names as
  whole words, in any case. DataComp looked up the first WordNet synset of every single word and
  matched ImageNet-21k's synsets; here the class names themselves are matched, multi-word names
  included (RE2 regular expression, Unicode letters and digits as word characters).
* **CLIP score** (``clip_score_top_pct``, ``clip_score_model``): keep samples whose score is at
  least ``quantile_disc(score, 1 - pct / 100)`` over every scored sample of the snapshot: an exact
  quantile (the score at ascending position ``floor((N - 1)(1 - pct / 100))``), which DuckDB
  computes from the score column alone, without the ``samples`` joins. DataComp's ``get_threshold``
  takes the score at descending position ``floor(N pct / 100)``: the two differ by at most one
  sample. Per-shard mergeable sketches (KLL) reduced in one task were measured against it at 16M
  rows (``bench/subset_rules_bench.py``): the exact quantile costs a few hundred MB for one task and
  no extra per-shard step, and its threshold is the one the tests can state.
* **image clusters** (``image_targets``, ``image_cluster_size``): the pool's image embeddings are
  clustered by k-means; each target embedding (an ImageFolder, embedded with ``clip.english``, or an
  ``.npy``) picks its nearest centroid, exactly; samples whose embedding is in a picked cluster are
  kept. Dedup's centroids, and the nearest cluster it already gave every pool vector
  (``dedup_work/runs/*.primary.npy`` beside ``*.rank.npy``), are reused when its clusters hold between
  half and twice ``image_cluster_size`` embeddings; otherwise the rule trains its own with dedup's
  two-level k-means on a sample (:func:`laion_tasks.stages.dedup.dedup_centroids`) and assigns every
  pool embedding (the cost ``bench/subset_rules_bench.py`` measures). Pool vectors are assigned
  through the centroid tree (dedup's approximate nearest), targets against every leaf.

Order and accounting: after the predicate, text language, text class, CLIP score, then image
cluster; a sample's drop reason is the first rule it fails (:data:`RULE_OUTCOMES`). The rules
narrow the flag ``s<i>`` of curate's scan table *before* curate's within-subset dedup, so a
duplicate group keeps one member among the rows that pass every rule. What each rule decided
(threshold and model, clusters hit, class list) is the subset's ``rules`` record: it goes into the
manifest and the dataset card.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_tasks import layout, storage
from laion_tasks.config import ClipConfig, CurateConfig, DedupConfig, SubsetConfig
from laion_tasks.snapshot_db import SnapshotDB, table_dir
from laion_tasks.stage import StageError

log = logging.getLogger(__name__)

RULE_OUTCOMES = ("drop:text_language", "drop:text_class", "drop:clip_score", "drop:image_cluster")
"""Per-sample outcomes of the rules, in the order they are checked."""
SIMILARITY = "similarity"
REUSE_FACTOR = 2.0
"""Dedup's clusters are reused when their mean size is within this factor of ``image_cluster_size``."""
_MEMBERS = "subset_rule_members"


def has_rules(subset: SubsetConfig) -> bool:
    return subset.text_classes is not None or subset.clip_score_top_pct is not None or subset.image_targets is not None


@dataclass
class RuleOutcome:
    """What the rules did to one subset: samples dropped per rule, and the record for manifest and card."""

    drops: dict[str, int] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


def apply_rules(
    db: SnapshotDB, table: str, subsets: dict[str, SubsetConfig], config: CurateConfig, skip: set[str] | frozenset[str] = frozenset()
) -> dict[str, RuleOutcome]:
    """Narrow the flag ``s<i>`` of each subset with rules in ``table`` (curate's scan); return what each rule dropped.

    ``table`` holds, for rows whose flag is set, the LAION columns (``TEXT``, ``LANGUAGE``,
    ``similarity``, ``key``), ``_shard`` and dedup's ``_rank``.
    """
    pools = _PoolCache(db, config)
    out: dict[str, RuleOutcome] = {}
    for i, (name, subset) in enumerate(subsets.items()):
        if name in skip or not has_rules(subset):
            continue
        flag, result = f"s{i}", RuleOutcome()
        try:
            if subset.text_classes is not None:
                names = load_class_names(subset.text_classes)
                languages = ", ".join(_sql_str(lang) for lang in subset.text_languages) or "NULL"
                result.drops["drop:text_language"] = _narrow(db, table, flag, f'"LANGUAGE" IN ({languages})')
                result.drops["drop:text_class"] = _narrow(db, table, flag, 'regexp_matches("TEXT", ?)', [class_pattern(names)])
                result.record["text"] = {
                    "languages": list(subset.text_languages), "classes": len(names), "first_classes": names[:12],
                    "source": subset.text_classes if isinstance(subset.text_classes, str) else "inline list",
                }
            if subset.clip_score_top_pct is not None:
                score = score_threshold(db, subset.clip_score_top_pct, subset.clip_score_model)
                result.drops["drop:clip_score"] = _narrow_by_score(db, table, flag, score)
                result.record["clip_score"] = score.record()
            if subset.image_targets is not None:
                dropped, record = _image_rule(db, table, flag, subset, pools)
                result.drops["drop:image_cluster"] = dropped
                result.record["image_clusters"] = record
        except StageError as exc:
            raise StageError(f"subset {name}: {exc}") from exc
        out[name] = result
    return out


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _narrow(db: SnapshotDB, table: str, flag: str, keep_sql: str, params: list[Any] | None = None) -> int:
    """Clear ``flag`` of eligible rows where it is set and ``keep_sql`` is not true (NULL fails); return how many.

    Only eligible rows count (and carry the LAION columns): the flag of other rows is never read."""
    cond = f"base_outcome = 'eligible' AND {flag} AND NOT coalesce(({keep_sql}), false)"
    n = int(db.con.execute(f"SELECT count(*) FROM {table} WHERE {cond}", params or []).fetchall()[0][0])
    if n:
        db.con.execute(f"UPDATE {table} SET {flag} = false WHERE {cond}", params or []).fetchall()
    return n


# -- the text rule -------------------------------------------------------------------------


def load_class_names(spec: list[str] | str) -> list[str]:
    """Class names: a list, a ``.json`` list (``builtin:en_classnames.json#imagenet1k`` picks from the
    packaged CLIP_benchmark names), or a text file with one name per line."""
    from laion_tasks.stages.evaluate.datasets import load_classnames

    if isinstance(spec, list):
        names = spec
    elif spec.startswith("builtin:") or spec.split("#", 1)[0].endswith(".json"):
        path, _, key = spec.partition("#")
        names = load_classnames(spec, key or None) if key else load_classnames(path)
    else:
        try:
            names = storage.read_text(spec).splitlines()
        except (OSError, storage.StorageError) as exc:
            raise StageError(f"text_classes file {spec}: cannot be read: {exc}") from exc
    cleaned = list(dict.fromkeys(" ".join(n.split()) for n in names if n and n.strip()))
    if not cleaned:
        raise StageError(f"text_classes {spec if isinstance(spec, str) else 'list'} holds no class name")
    return cleaned


def class_pattern(names: list[str]) -> str:
    """An RE2 pattern true when a text contains one of ``names`` as whole words, any case, any whitespace between."""
    alternatives = sorted({r"\s+".join(re.escape(word) for word in n.split()) for n in names}, key=len, reverse=True)
    return r"(?i)(?:^|[^\pL\pN])(?:" + "|".join(alternatives) + r")(?:[^\pL\pN]|$)"


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


# -- the image-cluster rule -----------------------------------------------------------------


def _image_files(root: Path) -> list[Path]:
    from laion_tasks.stages.evaluate.datasets import IMAGE_EXTENSIONS

    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


@functools.lru_cache(maxsize=8)
def _embed_folder(directory: str, model: str, pretrained: str | None, checkpoint: str | None, device: str, seed: int) -> np.ndarray:
    """L2-normalised image embeddings of every image under ``directory`` (cached: the card asks again)."""
    import torch
    from PIL import Image

    from laion_tasks.models.clip import cached_clip, encode_images

    files = _image_files(Path(directory))
    if not files:
        raise StageError(f"image_targets {directory}: no image files")
    clip = cached_clip(model, pretrained, checkpoint, device, seed)
    out = []
    for start in range(0, len(files), 64):
        batch = []
        for path in files[start : start + 64]:
            try:
                with Image.open(path) as img:
                    batch.append(clip.preprocess(img.convert("RGB")))
            except OSError as exc:
                raise StageError(f"image_targets {path}: not a readable image: {exc}") from exc
        out.append(encode_images(clip, torch.stack(batch)).numpy())
    return np.concatenate(out).astype(np.float32)


def target_embeddings(spec: str, clip: ClipConfig) -> tuple[np.ndarray, str]:
    """(normalised fp32 embeddings, how they were made) of the image rule's target set."""
    if spec.endswith(".npy"):
        try:
            with storage.local_copy(spec) as path:
                x = np.load(path, allow_pickle=False)
        except (OSError, ValueError, storage.StorageError) as exc:
            raise StageError(f"image_targets {spec}: cannot read embeddings: {exc}") from exc
        if x.ndim != 2 or not len(x):
            raise StageError(f"image_targets {spec}: expected a non-empty (n, d) array, got shape {x.shape}")
        x = x.astype(np.float32)
        how = "embeddings file"
    else:
        directory = storage.local_path(spec)
        if not directory.is_dir():
            raise StageError(f"image_targets {spec}: neither an ImageFolder directory nor a .npy file")
        m = clip.english
        x = _embed_folder(str(directory), m.model, m.pretrained, m.checkpoint, clip.device, clip.seed)
        how = f"images embedded with {m.model}" + (f" ({m.checkpoint or m.pretrained})" if (m.checkpoint or m.pretrained) else "")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), how


class _Pool(abc.ABC):
    """The pool's image embeddings clustered: centroids, and which pool samples are in given clusters."""

    source: str
    vectors: int

    def __init__(self, centroids: Any) -> None:
        self.centroids = centroids

    @property
    def clusters(self) -> int:
        return int(self.centroids.n_leaves)

    def nearest(self, targets: np.ndarray) -> np.ndarray:
        """Each target's nearest leaf, searched exhaustively (targets are few)."""
        import faiss

        from laion_tasks.stages.dedup import _normalise

        if targets.shape[1] != self.centroids.leaves.shape[1]:
            raise StageError(f"target embeddings have {targets.shape[1]} dimensions, the pool's {self.centroids.leaves.shape[1]}")
        _, ids = faiss.knn(_normalise(targets - self.centroids.mean), self.centroids.leaves, 1, metric=faiss.METRIC_INNER_PRODUCT)
        return ids[:, 0].astype(np.int64)

    @abc.abstractmethod
    def keep_sql(self, db: SnapshotDB, hits: np.ndarray) -> str:
        """SQL true for scan rows in a hit cluster (registers the members it reads in ``db``)."""


class DedupPool(_Pool):
    """Dedup's centroids and its per-vector nearest cluster (``runs/*.primary.npy``), joined on dedup's rank."""

    source = "dedup"

    def __init__(self, centroids: Any, runs: list[str], vectors: int) -> None:
        super().__init__(centroids)
        self.runs, self.vectors = runs, vectors

    def members(self, hits: np.ndarray) -> np.ndarray:
        """Dedup ranks of the pool vectors whose nearest cluster is in ``hits``."""
        out = []
        for prefix in self.runs:
            with storage.local_copy(f"{prefix}.primary.npy") as p, storage.local_copy(f"{prefix}.rank.npy") as r:
                primary, rank = np.load(p, mmap_mode="r"), np.load(r, mmap_mode="r")
                out.append(np.asarray(rank[np.isin(primary, hits)], dtype=np.int64))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def keep_sql(self, db: SnapshotDB, hits: np.ndarray) -> str:
        db.con.register(_MEMBERS, pa.table({"rank": self.members(hits)}))
        return f"_rank IN (SELECT rank FROM {_MEMBERS})"


class OwnPool(_Pool):
    """Centroids the rule trained, and every pool embedding's cluster (assigned once per process and run)."""

    source = "rule"

    def __init__(self, centroids: Any, shards: list[tuple[str, str, str]]) -> None:
        super().__init__(centroids)
        self.shards = shards
        self.assigned: list[np.ndarray] = [assign_shard(clip, emb, centroids) for _, clip, emb in shards]
        self.vectors = int(sum(int((a >= 0).sum()) for a in self.assigned))

    def keep_sql(self, db: SnapshotDB, hits: np.ndarray) -> str:
        from laion_tasks.stage import read_parquet

        ids = []
        for (shard, clip_uri, _), clusters in zip(self.shards, self.assigned):
            keys = read_parquet(clip_uri, "clip parquet", ["key"]).column(0).cast(pa.string())
            picked = keys.filter(pa.array(np.isin(clusters, hits)))
            ids.append(pc.binary_join_element_wise(pa.scalar(shard), picked, "/"))
        column = pa.chunked_array([c for a in ids for c in a.chunks], pa.string()) if ids else pa.chunked_array([], pa.string())
        db.con.register(_MEMBERS, pa.table({"id": column}))
        return f"_shard || '/' || key IN (SELECT id FROM {_MEMBERS})"


def assign_shard(clip_uri: str, emb_uri: str, centroids: Any, chunk: int = 65_536) -> np.ndarray:
    """Each clip row's nearest cluster through the centroid tree (-1 without an embedding)."""
    from laion_tasks.stages.dedup import _embedding_rows, _has_embedding, _normalise

    has = _has_embedding(clip_uri)
    out = np.full(len(has), -1, dtype=np.int32)
    with storage.local_copy(emb_uri) as path:
        emb = np.load(path, mmap_mode="r")
        rows = _embedding_rows(has, emb.shape[0], emb_uri)
        with_vec = np.flatnonzero(rows >= 0)
        for start in range(0, len(with_vec), chunk):
            sel = with_vec[start : start + chunk]
            out[sel] = centroids.assign(_normalise(emb[rows[sel]]), 1)[:, 0]
    return out


class _PoolCache:
    """One clustering per wanted cluster size per scan: subsets that want the same size share it."""

    def __init__(self, db: SnapshotDB, config: CurateConfig) -> None:
        self.db, self.config = db, config
        self.pools: dict[int, _Pool] = {}

    def get(self, cluster_size: int, has_ranks: bool) -> _Pool:
        if cluster_size not in self.pools:
            self.pools[cluster_size] = (has_ranks and dedup_pool(self.db, cluster_size)) or own_pool(self.db, cluster_size, self.config)
        return self.pools[cluster_size]


def dedup_pool(db: SnapshotDB, cluster_size: int) -> DedupPool | None:
    """Dedup's clustering when it exists and its clusters hold about ``cluster_size`` embeddings, else None."""
    from laion_tasks.stages.dedup import Centroids, centroids_uri, list_runs, work_dir_for

    work = work_dir_for(db.root, db.snapshot)
    uri = centroids_uri(work)
    runs = list_runs(work)
    if not storage.exists(uri) or not runs or not all(storage.exists(f"{r}.primary.npy") for r in runs):
        return None
    centroids = Centroids.load(uri)
    vectors = 0
    for prefix in runs:
        with storage.local_copy(f"{prefix}.primary.npy") as path:
            vectors += int(np.load(path, mmap_mode="r").shape[0])
    size = vectors / max(1, centroids.n_leaves)
    if not cluster_size / REUSE_FACTOR <= size <= cluster_size * REUSE_FACTOR:
        log.info("dedup's %d clusters hold %.0f embeddings each; the image rule wants %d: clustering anew",
                 centroids.n_leaves, size, cluster_size)
        return None
    return DedupPool(centroids, runs, vectors)


def pool_shards(db: SnapshotDB) -> list[tuple[str, str, str]]:
    """(shard, clip parquet, image embeddings) of every clip shard with embeddings."""
    base = table_dir(db.root, db.snapshot, "clip").rstrip("/") + "/"
    out = []
    for uri in storage.list_uris(base, ".parquet"):
        rel = uri[len(base) :]
        shard = rel[: -len(".parquet")]
        emb = layout.clip_image_emb_uri(db.root, db.snapshot, shard)
        if "/" not in rel and storage.exists(emb):  # the table is flat; sub-folders are work files
            out.append((shard, uri, emb))
    return out


def own_pool(db: SnapshotDB, cluster_size: int, config: CurateConfig) -> OwnPool:
    """Dedup's two-level k-means with ``embeddings / cluster_size`` leaves, trained on a sample of the pool."""
    from laion_tasks.stages.dedup import Centroids, ShardInput, dedup_centroids

    shards = pool_shards(db)
    if not shards:
        raise StageError(f"image rule: no clip shard of {db.snapshot} has image embeddings")
    settings = DedupConfig(cluster_size=cluster_size, near_dup_probes=1, memory_limit=config.duckdb_memory_limit)
    uri = str(db.work_dir / f"rule-centroids-{cluster_size}.npz")
    dedup_centroids([ShardInput(s, "", clip, emb) for s, clip, emb in shards], uri, settings)
    return OwnPool(Centroids.load(uri), shards)


def _image_rule(db: SnapshotDB, table: str, flag: str, subset: SubsetConfig, pools: _PoolCache) -> tuple[int, dict[str, Any]]:
    assert subset.image_targets is not None
    clip = db.clip or ClipConfig()
    targets, how = target_embeddings(subset.image_targets, clip)
    has_ranks = bool(db.con.execute(f"SELECT count(_rank) > 0 FROM {table}").fetchall()[0][0])
    pool = pools.get(subset.image_cluster_size, has_ranks)
    hits = np.unique(pool.nearest(targets))
    try:
        dropped = _narrow(db, table, flag, pool.keep_sql(db, hits))
    finally:
        with contextlib.suppress(Exception):
            db.con.unregister(_MEMBERS)
    return dropped, {
        "targets": subset.image_targets,
        "target_embeddings": int(targets.shape[0]),
        "target_source": how,
        "clusters": pool.clusters,
        "clusters_hit": int(hits.size),
        "pool_embeddings": pool.vectors,
        "embeddings_per_cluster": round(pool.vectors / max(1, pool.clusters), 1),
        "centroids": "dedup's, reused" if pool.source == "dedup" else "trained by the rule (dedup's k-means)",
    }


# -- the card ---------------------------------------------------------------------------------


def describe(record: dict[str, Any]) -> list[str]:
    """Markdown bullet lines for a subset's rules record (manifest ``rules``)."""
    lines: list[str] = []
    text = record.get("text")
    if text:
        shown = ", ".join(f"`{n}`" for n in text["first_classes"]) + (" ..." if text["classes"] > len(text["first_classes"]) else "")
        lines.append(f"- **text rule:** language in {text['languages']}, then the caption names one of {text['classes']:,} "
                     f"class(es) ({text['source']}): {shown}")
    score = record.get("clip_score")
    if score:
        threshold = "none (no scored sample)" if score["threshold"] is None else f"{score['threshold']:.6g}"
        model = score["score"] + (f" (model: {', '.join(score['models'])})" if score["models"] else "")
        lines.append(f"- **CLIP-score rule:** top {score['top_pct']:g}% of {score['population']:,} scored samples: "
                     f"score >= **{threshold}**; score: {model}; {score['quantile']}")
    image = record.get("image_clusters")
    if image:
        lines.append(f"- **image-cluster rule:** {image['target_embeddings']:,} targets ({image['target_source']}, "
                     f"`{image['targets']}`) hit **{image['clusters_hit']:,} of {image['clusters']:,}** clusters of "
                     f"{image['pool_embeddings']:,} pool embeddings ({image['embeddings_per_cluster']:g} per cluster; "
                     f"centroids {image['centroids']})")
    return lines


def datacomp_subsets(targets: str, class_names: list[str] | str, top_pct: float = 30.0, where: str = "language = 'en'",
                     cluster_size: int = 1000, write_images: bool = True) -> dict[str, dict[str, Any]]:
    """DataComp's baselines as subset configs: CLIP score top N%, image clusters ∩ CLIP score, text classes."""
    common = {"where": where, "write_images": write_images}
    return {
        f"datacomp-clip{top_pct:g}": {**common, "clip_score_top_pct": top_pct,
                                      "description": f"DataComp: CLIP score top {top_pct:g}% of the snapshot"},
        f"datacomp-image-clip{top_pct:g}": {**common, "clip_score_top_pct": top_pct, "image_targets": targets,
                                            "image_cluster_size": cluster_size,
                                            "description": f"DataComp: image clusters of the targets ∩ CLIP score top {top_pct:g}%"},
        "datacomp-text": {**common, "text_classes": class_names,
                          "description": "DataComp: the caption names a target class (language filter first)"},
    }


__all__ = [
    "RULE_OUTCOMES", "RuleOutcome", "ScoreThreshold", "apply_rules", "class_pattern", "datacomp_subsets",
    "dedup_pool", "describe", "has_rules", "load_class_names", "own_pool", "score_threshold", "target_embeddings",
]
