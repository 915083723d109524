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

import logging
from dataclasses import dataclass, field
from typing import Any


from laion_tasks.config import CurateConfig, SubsetConfig
from laion_tasks.snapshot_db import SnapshotDB
from laion_tasks.stage import StageError

from laion_tasks.stages.subset_rules.common import _MEMBERS, RULE_OUTCOMES, _narrow, _sql_str
from laion_tasks.stages.subset_rules.image import DedupPool, OwnPool, _image_rule, _PoolCache, own_pool, pool_shards, target_embeddings
from laion_tasks.stages.subset_rules.score import ScoreThreshold, _narrow_by_score, score_threshold
from laion_tasks.stages.subset_rules.text import class_pattern, load_class_names

__all__ = ["RULE_OUTCOMES", "DedupPool", "OwnPool", "ScoreThreshold", "apply_rules", "class_pattern", "datacomp_subsets",
           "describe", "has_rules", "load_class_names", "own_pool", "pool_shards", "score_threshold", "target_embeddings",
           "_MEMBERS", "_narrow"]

log = logging.getLogger(__name__)


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
