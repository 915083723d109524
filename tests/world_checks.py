"""Checks of meaning: a pipeline run on the fixture crawl against the truth the crawl planted.

Shared by ``tests/test_e2e.py`` (``airflow dags test``) and ``tests/test_deployment.py`` (the real
scheduler). The figures come from :mod:`laion_tasks.fixtures.world_report`; the bars are here.
Each bar guards a stage, and fails when that stage reads the wrong rows:

- CLIP filter (clip stage + curate's thresholds): keeps >= 90% of matched pairs and drops >= 90%
  of the pairs whose caption names another colour or shape, per language route. Captions
  shuffled within a shard before CLIP fail it.
- Search (index + serve): "a green triangle" has precision@5 >= 0.8, and an image query with a
  planted picture returns its copies first. An id map off by one fails it.
- Zero-shot (eval): the world model reaches >= 3x chance on the fixture eval set.
- pwatermark (tag): AUC >= 0.9 for the watermarked pictures. Embedding rows shifted by one fail it.
- Near-dup dedup: finds >= 90% of the resized / re-encoded copies and merges no distinct pictures.
- Safety: punsafe comes from NudeNet and the card says so, at most a few false positives, and
  research-safe and laion400m have rows.
"""

from __future__ import annotations

from pathlib import Path

from laion_tasks.config import Settings
from laion_tasks.fixtures.world_report import WorldReport, measure

MIN_CLIP_RECALL = 0.9
MIN_CLIP_DROP_RATE = 0.9
MIN_SEARCH_PRECISION = 0.8
MIN_CHANCE_MULTIPLE = 3.0
MIN_WATERMARK_AUC = 0.9
MIN_NEAR_DUP_RECALL = 0.9
MIN_PAIRS_PER_ROUTE = 3
"""A route's bar means something only with a few pairs of each kind."""
MAX_FLAGGED_SHARE = 0.05
"""Nothing unsafe is generated, but NudeNet is a real detector: it scores some circles up to ~0.5 (measured:
1 of 64 tagged world pictures above 0.5), so a few false positives are its honest answer, not a failure."""


def world_failures(report: WorldReport) -> list[str]:
    """Every bar the report misses, one line each (empty: the run means what the truth says)."""
    failures: list[str] = []
    for route, m in report.clip.items():
        if m["matched"] < MIN_PAIRS_PER_ROUTE or m["mismatched"] < MIN_PAIRS_PER_ROUTE:
            failures.append(f"clip {route}: too few scored pairs to judge ({m['matched']} matched, {m['mismatched']} mismatched)")
            continue
        if m["recall"] < MIN_CLIP_RECALL:
            failures.append(f"clip {route}: kept {m['matched_kept']}/{m['matched']} matched pairs (< {MIN_CLIP_RECALL:.0%}): {m['lost']}")
        if m["drop_rate"] < MIN_CLIP_DROP_RATE:
            failures.append(f"clip {route}: dropped {m['mismatched_dropped']}/{m['mismatched']} mismatched pairs "
                            f"(< {MIN_CLIP_DROP_RATE:.0%}): {m['missed']}")
    if report.search is None:
        failures.append("search: no index was built for the served subset")
    else:
        text = report.search["text"]
        if text["precision"] < MIN_SEARCH_PRECISION:
            failures.append(f"search {text['query']!r}: precision@{text['k']} {text['precision']:.2f} < {MIN_SEARCH_PRECISION}: "
                            f"{[(h['caption'], h['shows']) for h in text['hits']]}")
        if not report.search["images"]:
            failures.append("image search: no planted picture with copies reached the index")
        for group in report.search["images"]:
            if not group["copies_first"]:
                failures.append(f"image search with {group['query']}: its {group['copies_in_index']} copies are not "
                                f"first: {group['top']}")
    if report.zero_shot is None:
        failures.append("zero-shot: not measured (no world model or no eval.dataset)")
    else:
        world = report.zero_shot["world"]
        if world["top1"] is None or world["top1"] < MIN_CHANCE_MULTIPLE * world["chance"]:
            failures.append(f"zero-shot: world model top-1 {world['top1']} < {MIN_CHANCE_MULTIPLE} x chance {world['chance']:.3f}")
    wm = report.watermark
    if wm["auc"] is None or wm["auc"] < MIN_WATERMARK_AUC:
        failures.append(f"pwatermark: AUC {wm['auc']} < {MIN_WATERMARK_AUC} ({wm['watermarked']} watermarked, {wm['clean']} clean)")
    nd = report.near_dup
    if not nd["near_copies"]:
        failures.append("near-dup: no planted resized / re-encoded copy was scored")
    elif nd["recall"] < MIN_NEAR_DUP_RECALL:
        failures.append(f"near-dup: found {nd['near_copies_found']}/{nd['near_copies']} copies at {nd['threshold']}: {nd['missed']}")
    if nd["false_merges"]:
        failures.append(f"near-dup: distinct pictures merged at {nd['threshold']}: {nd['false_merges'][:5]}")
    sf = report.safety
    if set(sf["methods"]) != {"nudenet"}:
        failures.append(f"punsafe: expected NudeNet scores, got methods {sf['methods']}")
    if not sf["card"] or "NudeNet" not in sf["card"]:
        failures.append(f"card: does not say punsafe comes from NudeNet: {sf['card']!r}")
    if sf["above_half"] > MAX_FLAGGED_SHARE * max(1, sf["tagged"]):
        failures.append(f"punsafe: {sf['above_half']} of {sf['tagged']} world pictures scored above 0.5 (nothing unsafe "
                        f"is generated; NudeNet's false positives stay under {MAX_FLAGGED_SHARE:.0%})")
    for name, subset in sf["subsets"].items():
        if subset["status"] != "ok" or subset["rows"] == 0:
            failures.append(f"subset {name}: {subset['status']} with {subset['rows']} rows")
    return failures


def assert_world_checks(settings: Settings, snapshot: str, truth_path: Path, crawl_dir: Path) -> WorldReport:
    """Measure the run against the truth and fail with every missed bar at once (figures in the message)."""
    english = settings.clip.english
    report = measure(settings, snapshot, truth_path, crawl_dir, english.model, english.checkpoint)
    failures = world_failures(report)
    assert not failures, "\n".join(["the run does not mean what the fixture crawl planted:", *failures, *report.lines()])
    return report
