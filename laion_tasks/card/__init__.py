"""Dataset card (its facts in :mod:`.facts`, its charts in :mod:`.charts`, its Markdown here): Markdown + PNG charts per snapshot (``card/``) and per subset (``subsets/<name>/``).

Every number is an aggregate computed by DuckDB over the snapshot's Parquet (histograms
are ``GROUP BY`` bucket queries), so a card never loads a snapshot into memory. The
funnel starts in lineage (WAT files -> links -> candidates, which Parquet no longer
shows), continues with the Parquet counts (download -> CLIP -> hash lists -> dedup) and
ends at each subset. Where lineage and Parquet both know a number, the card shows
whether they agree.

The thumbnail grids never show hash-list-blocked samples, samples flagged unsafe
(``punsafe >= 0.5`` or ``nsfw_text``), nor samples with no safety score (``punsafe`` or
``nsfw_text`` null: not known to be safe): the card is meant to be published.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

from laion_tasks import layout, storage
from laion_tasks.config import ClipConfig, CurateConfig, Settings
from laion_tasks.lineage import Lineage
from laion_tasks.snapshot_db import SAMPLES_VIEW, SnapshotDB, open_snapshot
from laion_tasks.stage import ShardStats
from laion_tasks.stages.subset_rules import describe as describe_rules
from laion_tasks.stages.curate import (
    ELIGIBLE,
    HASH_DEFINITION,
    LAION_COLUMNS,
    count_subsets,
    eligible_sql,
    read_manifest,
)

from laion_tasks.card.charts import _funnel_chart, _grid_chart, _shares_chart, _similarity_chart, _size_chart
from laion_tasks.card.facts import (
    BASE_LABELS,
    SubsetInfo,
    _lineage_sections,
    _passed,
    _rows,
    _sample_rows,
    _shares,
    _similarity_hist,
    _size_hist,
    _status_counts,
    _subset_info,
    _thumbnails,
)

log = logging.getLogger(__name__)

NSFW_METHODS = {
    "laion_detector": "LAION's CLIP-based NSFW detector head",
    "zero_shot": "CLIP zero-shot with the tag.nsfw_prompts / tag.safe_prompts",
    "nudenet": "NudeNet's ONNX detector (exposed-body classes)",
}
"""What each ``nsfw_method`` value means, for the card's reader."""


def _outcome_table(outcomes: Mapping[str, int]) -> list[str]:
    total = sum(outcomes.values())
    lines = ["| outcome | samples | share |", "|---|---:|---:|"]
    for k, v in sorted(outcomes.items(), key=lambda kv: (kv[0] != "kept", -kv[1], kv[0])):
        lines.append(f"| {k} | {v:,} | {100.0 * v / total if total else 0:.1f}% |")
    lines.append(f"| **total** | **{total:,}** | |")
    return lines


def _write_subset_card(db: SnapshotDB, info: SubsetInfo, config: CurateConfig) -> str:
    out_dir = layout.subset_dir(db.root, db.snapshot, info.name)
    lines = [
        f"# {info.name} ({db.snapshot})",
        "",
        info.description or "",
        "",
        f"- **state:** {info.state}" + (f" - {info.reason}" if info.reason else ""),
        f"- **samples:** {info.rows:,}",
        f"- **predicate:** `{info.where}`",
        f"- **entry rules:** downloaded, CLIP-scored{', kept by the CLIP threshold' if config.require_clip_kept else ''}, "
        "not on a hash list, not a duplicate; then the predicate (NULL counts as false).",
        *describe_rules(info.rules),
    ]
    if info.note:
        lines += ["", f"> **Note:** {info.note}"]
    lines += ["", "## Every sample of the snapshot, counted once", "", *_outcome_table(info.outcomes)]
    if info.state == "ok" and info.files:
        lines += [
            "",
            "## Files",
            "",
            "Parquet in LAION's column layout: " + ", ".join(f"`{c}`" for c in LAION_COLUMNS) + ".",
            "`WIDTH`/`HEIGHT` are the original image's size; `status` is the download status.",
            HASH_DEFINITION,
            "",
            *[f"- `{f['name']}`: {int(f['rows']):,} rows" for f in info.files],
        ]
        if info.webdataset and info.webdataset.get("train_data"):
            wds = info.webdataset
            lines += [
                "",
                f"WebDataset: {int(wds['samples']):,} samples in {len(wds['shards'])} tar(s) under `{wds['dir']}/` "
                f"(`KEY.jpg`, `KEY.txt`, `KEY.json`), with `sizes.json` for open_clip"
                + (f"; {wds['missing_images']} samples had no image in their download tar" if wds.get("missing_images") else "")
                + ".",
                "",
                "```",
                "python -m open_clip_train.main --dataset-type webdataset \\",
                f"  --train-data '{storage.join(out_dir, wds['train_data'])}' \\",
                f"  --train-num-samples {int(wds['samples'])} --model ViT-B-32 ...",
                "```",
            ]
    if info.state in ("ok", "not written"):
        hist = _similarity_hist(db, f"{eligible_sql(config)} AND coalesce(({info.where}), false)")
        if hist:
            _similarity_chart(hist, storage.join(out_dir, "similarity.png"), f"{info.name}: CLIP similarity")
            lines += ["", "## CLIP similarity", "", "![similarity](similarity.png)"]
    uri = storage.join(out_dir, "README.md")
    storage.write_text(uri, "\n".join(lines) + "\n")
    return uri


# -- the card -------------------------------------------------------------------


def write_dataset_card(
    root: str,
    snapshot: str,
    lineage: Lineage | None,
    subsets: Mapping[str, ShardStats] | None = None,
    out_dir: str | None = None,
    *,
    config: CurateConfig | None = None,
    clip: ClipConfig | None = None,
) -> str:
    """Write ``README.md`` + charts for a snapshot and a README per subset; return the card's URI.

    ``subsets``: what ``curate_subset`` returned this run (optional); otherwise each
    subset's ``manifest.json`` is read, and subsets never written are shown with the
    counts their predicate gives now.
    """
    config = config or CurateConfig()
    out_dir = out_dir or layout.card_dir(root, snapshot)
    subsets = subsets or {}
    with open_snapshot(root, snapshot, config, clip) as db:
        counts = count_subsets(db, config.subsets, config)
        names = list(config.subsets) + [n for n in subsets if n not in config.subsets]
        infos = [
            _subset_info(n, config.subsets.get(n), subsets.get(n), read_manifest(root, snapshot, n), counts)
            for n in names
        ]
        # Curate rows are per subset (shard id = subset name) and would add up across subsets: shown per subset below.
        lineage_rows = [r for r in (lineage.funnel(snapshot) if lineage is not None else []) if r.stage != "curate"]
        stages = _lineage_sections(lineage_rows)
        wat_files = (lineage.shard_summary(snapshot).get("extract", {}).get("done") if lineage is not None else None)
        statuses = _status_counts(db)
        clip_rows = int(_rows(db, f"SELECT count(*) FILTER (has_clip_row) FROM {SAMPLES_VIEW}")[0][0])

        # Funnel: lineage for what Parquet no longer shows, then Parquet, then subsets.
        steps: list[tuple[str, int]] = []
        if "extract" in stages:
            steps.append(("links seen in WAT (extract input)", sum(stages["extract"].values())))
            steps.append(("candidates (extract kept)", _passed(stages["extract"])))
        remaining = counts.total
        steps.append(("download attempts", remaining))
        step_names = {
            "drop:not_downloaded": "downloaded",
            "drop:not_clip_scored": "CLIP-scored",
            "drop:clip_filtered": "kept by CLIP threshold",
            "drop:hashlist_blocked": "not hash-listed (eligible)",
        }
        for outcome, label in step_names.items():
            if outcome in counts.base:
                remaining -= counts.base[outcome]
                steps.append((label, remaining))
        # dedup runs again within each subset (a group keeps one member in every subset it qualifies for)
        steps.append(("after snapshot-wide dedup", remaining - counts.snapshot_duplicates))
        for info in infos:
            if info.state != "unavailable":
                steps.append((f"subset {info.name}", info.rows))
        _funnel_chart(steps, storage.join(out_dir, "funnel.png"), f"{snapshot}: from WAT links to subsets")

        checks: list[tuple[str, int, int]] = []
        if "download" in stages:
            checks.append(("download rows: lineage vs images parquet", sum(stages["download"].values()), counts.total))
            success = next((n for s, n in statuses if s == "success"), 0)
            checks.append(("downloaded images: lineage success vs parquet status=success", _passed(stages["download"]), success))
        if "clip" in stages:
            checks.append(("CLIP rows: lineage vs clip parquet", sum(stages["clip"].values()), clip_rows))

        sim_hist = _similarity_hist(db)
        if sim_hist:
            _similarity_chart(sim_hist, storage.join(out_dir, "similarity.png"), f"{snapshot}: CLIP similarity")
        _size_chart(_size_hist(db, "original_width"), _size_hist(db, "original_height"), storage.join(out_dir, "image_size.png"))
        langs, groups = _shares(db, "language"), _shares(db, "language_group")
        _shares_chart(langs, groups, storage.join(out_dir, "languages.png"))

        safety_sources = [(str(m), int(c)) for m, c in _rows(
            db, f"SELECT coalesce(nsfw_method, 'unrecorded'), count(*) FROM {SAMPLES_VIEW} WHERE punsafe IS NOT NULL "
            "GROUP BY 1 ORDER BY 2 DESC, 1")]

        n = config.card_sample_images
        kept = _sample_rows(db, eligible_sql(config), n, config)
        dropped = _sample_rows(db, f"base_outcome <> '{ELIGIBLE}'", n, config)
        thumbs = _thumbnails(db, kept + dropped)
        n_kept = _grid_chart(kept, thumbs, storage.join(out_dir, "samples_kept.png"), "kept (eligible for subsets)")
        n_dropped = _grid_chart(dropped, thumbs, storage.join(out_dir, "samples_dropped.png"), "dropped (with drop reason)")

        subset_cards = {info.name: _write_subset_card(db, info, config) for info in infos}

    lines = [f"# Dataset card: {snapshot}", ""]
    lines += [
        f"Root: `{root}`. Counts are computed from the Parquet files with DuckDB"
        + (" and from the lineage database." if lineage is not None else "; no lineage database was given."),
        "",
        "## Funnel",
        "",
        "![funnel](funnel.png)",
        "",
    ]
    if wat_files is not None:
        lines.append(f"- WAT files processed: **{wat_files:,}**")
    for label, value in steps:
        lines.append(f"- {label}: **{value:,}**")
    if stages:
        lines += ["", "### Per stage, from lineage (done shards)", "", "| stage | outcome | samples | shards |", "|---|---|---:|---:|"]
        for r in lineage_rows:
            lines.append(f"| {r.stage} | {r.outcome} | {r.count:,} | {r.shards:,} |")
    lines += ["", "### Why samples are not in any subset (Parquet)", "", "| reason | samples |", "|---|---:|"]
    for outcome, value in counts.base.items():
        lines.append(f"| {BASE_LABELS.get(outcome, outcome)} (`{outcome}`) | {value:,} |")
    lines.append(f"| **total download rows** | **{counts.total:,}** |")
    lines += ["", "Download status:", "", "| status | samples |", "|---|---:|"]
    lines += [f"| {s} | {v:,} |" for s, v in statuses]
    if checks:
        lines += ["", "### Consistency: lineage vs Parquet", "", "| check | lineage | parquet | |", "|---|---:|---:|---|"]
        for label, a, b in checks:
            lines.append(f"| {label} | {a:,} | {b:,} | {'ok' if a == b else '**MISMATCH**'} |")
    lines += [
        "",
        "## Distributions",
        "",
        *(["![similarity](similarity.png)", ""] if sim_hist else []),
        "![image size](image_size.png)",
        "",
        "![languages](languages.png)",
        "",
        "| language group | samples | share |",
        "|---|---:|---:|",
    ]
    group_total = sum(v for _, v in groups)
    lines += [f"| {g} | {v:,} | {100.0 * v / group_total:.1f}% |" for g, v in groups]
    lines += [
        "",
        "## Samples",
        "",
        f"{n_kept} kept and {n_dropped} dropped samples, chosen by the MD5 of their key. Hash-list hits, samples "
        "flagged unsafe (punsafe >= 0.5, unsafe caption) and samples without a safety score are never shown.",
        "",
        "punsafe comes from: " + (", ".join(f"{NSFW_METHODS.get(m, m)} (`{m}`, {c:,} samples)" for m, c in safety_sources)
                                  or "no sample has a safety score") + ".",
        "",
        "![kept](samples_kept.png)",
        "",
        "![dropped](samples_dropped.png)",
        "",
        "## Subsets",
        "",
        "| subset | state | samples | predicate |",
        "|---|---|---:|---|",
    ]
    for info in infos:
        lines.append(f"| [{info.name}](../subsets/{info.name}/README.md) | {info.state} | {info.rows:,} | `{info.where}` |")
    for info in infos:
        lines += ["", f"### {info.name}", "", info.description or "", "", f"- state: **{info.state}**"]
        if info.reason:
            lines.append(f"- reason: {info.reason}")
        if info.note:
            lines.append(f"- note: {info.note}")
        lines += [f"- samples: **{info.rows:,}**", f"- predicate: `{info.where}`", *describe_rules(info.rules),
                  f"- card: `{subset_cards[info.name]}`"]
    uri = storage.join(out_dir, "README.md")
    storage.write_text(uri, "\n".join(lines) + "\n")
    return uri


def _metric(value: Any) -> str:
    if value is None:
        return "n/a (undefined for this eval set, e.g. top-5 with fewer than 5 classes)"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def post_eval_to_card(settings: Settings, snapshot: str, subset: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Append the zero-shot metrics of the model trained on a subset to the snapshot's and subset's cards."""
    metrics = evaluation.get("metrics") or {}
    if not metrics:
        return {"posted": False, "reason": evaluation.get("skipped", "no metrics")}
    lines = [
        "",
        f"## Zero-shot evaluation of CLIP trained on `{subset}`",
        "",
        f"Model `{settings.train.model}`, {settings.train.epochs} epoch(s); eval set `{settings.eval.dataset}`; "
        f"report: `{evaluation.get('report')}`.",
        "",
        "| metric | value |",
        "|---|---:|",
        *[f"| {k} | {_metric(v)} |" for k, v in sorted(metrics.items())],
        "",
    ]
    root = settings.storage.root
    targets = [
        storage.join(layout.card_dir(root, snapshot), "README.md"),
        storage.join(layout.subset_dir(root, snapshot, subset), "README.md"),
    ]
    marker = f"## Zero-shot evaluation of CLIP trained on `{subset}`"
    for uri in targets:
        if not storage.exists(uri):
            continue
        text = storage.read_text(uri)
        if marker in text:  # replace an earlier evaluation section
            head, _, rest = text.partition(marker)
            tail = rest.split("\n## ", 1)
            text = head.rstrip("\n") + ("\n\n## " + tail[1] if len(tail) > 1 else "\n")
        storage.write_text(uri, text.rstrip("\n") + "\n" + "\n".join(lines))
    return {"posted": True, "cards": targets, "metrics": metrics}


COMPARISON_MARKER = "## Zero-shot comparison of the subsets"


def _rules_summary(manifest: dict[str, Any]) -> str:
    """One table cell: the predicate and each DataComp rule of a subset, in a few words."""
    parts = [f"`{manifest.get('where', '')}`"]
    rules = manifest.get("rules") or {}
    if "text" in rules:
        parts.append(f"text: {rules['text']['classes']} class(es), {'/'.join(rules['text']['languages'])}")
    if "clip_score" in rules:
        score = rules["clip_score"]
        threshold = "n/a" if score["threshold"] is None else f"{score['threshold']:.4g}"
        parts.append(f"CLIP score top {score['top_pct']:g}% (>= {threshold})")
    if "image_clusters" in rules:
        image = rules["image_clusters"]
        parts.append(f"image clusters {image['clusters_hit']}/{image['clusters']}")
    return " ∩ ".join(parts)


def comparison_rows(settings: Settings, snapshot: str) -> list[dict[str, Any]]:
    """Per trained subset: its rules, size, samples seen in training and zero-shot metrics (None where missing)."""
    import json

    from laion_tasks.stages.train import trained_subsets

    root = settings.storage.root
    rows = []
    for subset in trained_subsets(settings.train):
        model = layout.model_dir(root, snapshot, subset)
        train_uri, eval_uri = storage.join(model, "train.json"), storage.join(model, "eval", "zeroshot.json")
        trained = json.loads(storage.read_text(train_uri)) if storage.exists(train_uri) else {}
        evaluated = json.loads(storage.read_text(eval_uri)) if storage.exists(eval_uri) else {}
        manifest = read_manifest(root, snapshot, subset) or {}
        rows.append({
            "subset": subset, "rules": _rules_summary(manifest) if manifest else "(not curated)",
            "rows": manifest.get("rows"), "usable": trained.get("usable_samples"),
            "samples_seen": trained.get("samples_seen"), "metrics": evaluated.get("metrics") or {},
        })
    return rows


def post_comparison_to_card(settings: Settings, snapshot: str) -> dict[str, Any]:
    """Write (or replace) the card's table of every trained subset's zero-shot scores, trained alike."""
    rows = comparison_rows(settings, snapshot)
    train, ev = settings.train, settings.eval

    def pct(value: Any) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"

    lines = [
        COMPARISON_MARKER,
        "",
        f"Each subset trained `{train.model}` with the same settings ({train.epochs} epoch(s), batch {train.batch_size}, "
        f"lr {train.lr:g}, seed {train.seed}"
        + (f", {train.samples_seen:,} samples seen each: a smaller subset is repeated" if train.samples_seen else
           ", one pass over each subset per epoch: the samples seen differ")
        + f"), then zero-shot on `{ev.dataset}` (CLIP_benchmark protocol).",
        "",
        "| subset | rules | samples | samples seen | top-1 | top-5 | mean per-class recall |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['subset']} | {r['rules']} | {r['rows'] if r['rows'] is not None else 'n/a'} | "
                     f"{r['samples_seen'] if r['samples_seen'] is not None else 'not trained'} | {pct(m.get('acc1'))} | "
                     f"{pct(m.get('acc5'))} | {pct(m.get('mean_per_class_recall'))} |")
    uri = storage.join(layout.card_dir(settings.storage.root, snapshot), "README.md")
    if storage.exists(uri):
        text = storage.read_text(uri)
        if COMPARISON_MARKER in text:  # replace an earlier comparison
            head, _, rest = text.partition(COMPARISON_MARKER)
            tail = rest.split("\n## ", 1)
            text = head.rstrip("\n") + ("\n\n## " + tail[1] if len(tail) > 1 else "\n")
        storage.write_text(uri, text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")
    return {"posted": storage.exists(uri), "card": uri, "rows": rows}
