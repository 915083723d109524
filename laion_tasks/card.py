"""Dataset card: Markdown + PNG charts per snapshot (``card/``) and per subset (``subsets/<name>/``).

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

import io
import logging
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

from laion_tasks import layout, storage
from laion_tasks.config import ClipConfig, CurateConfig, Settings, SubsetConfig
from laion_tasks.lineage import FunnelRow, Lineage
from laion_tasks.snapshot_db import SAMPLES_VIEW, SnapshotDB, open_snapshot
from laion_tasks.stage import ShardStats
from laion_tasks.wds import iter_samples
from laion_tasks.stages.subset_rules import describe as describe_rules
from laion_tasks.stages.curate import (
    ELIGIBLE,
    HASH_DEFINITION,
    LAION_COLUMNS,
    SubsetCounts,
    base_outcome_sql,
    count_subsets,
    eligible_sql,
    read_manifest,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
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
                        if info.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
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


# -- charts -----------------------------------------------------------------------


def _figure(width: float, height: float):  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig: Any, uri: str) -> None:
    with storage.atomic_local_path(uri, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})


def _funnel_chart(steps: list[tuple[str, int]], uri: str, title: str) -> None:
    fig = _figure(8, 0.45 * len(steps) + 1.2)
    ax = fig.subplots()
    labels = [s for s, _ in steps][::-1]
    values = [n for _, n in steps][::-1]
    ax.barh(range(len(values)), values, color="#4477aa")
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,}", va="center", fontsize=8)
    ax.set_xlabel("samples")
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 1000:
        ax.set_xscale("log")  # a real crawl spans billions of links down to thousands of high-res images
        ax.set_xlabel("samples (log scale)")
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.15)
    _save(fig, uri)


def _similarity_chart(hist: list[tuple[float, bool, int]], uri: str, title: str) -> None:
    fig = _figure(7, 3.5)
    ax = fig.subplots()
    kept = defaultdict(int)
    dropped = defaultdict(int)
    for b, k, n in hist:
        (kept if k else dropped)[b] += n
    xs = sorted(set(kept) | set(dropped))
    ax.bar(xs, [dropped[x] for x in xs], width=0.01, align="edge", color="#cc6677", label="filtered by CLIP")
    ax.bar(xs, [kept[x] for x in xs], width=0.01, align="edge", bottom=[dropped[x] for x in xs], color="#117733", label="kept by CLIP")
    ax.set_xlabel("CLIP image-text cosine similarity")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, uri)


def _size_chart(widths: list[tuple[int, int]], heights: list[tuple[int, int]], uri: str) -> None:
    fig = _figure(8, 3.2)
    axes = fig.subplots(1, 2)
    for ax, hist, name in ((axes[0], widths, "original width"), (axes[1], heights, "original height")):
        ax.bar([b for b, _ in hist], [n for _, n in hist], color="#4477aa")
        ax.set_xticks([b for b, _ in hist], [f"{2**b}" for b, _ in hist], fontsize=7, rotation=45)
        ax.set_xlabel(f"{name} (px, power-of-two buckets)")
        ax.set_ylabel("downloaded images")
    _save(fig, uri)


def _shares_chart(langs: list[tuple[str, int]], groups: list[tuple[str, int]], uri: str) -> None:
    fig = _figure(8, 3.5)
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    axes[0].bar(range(len(langs)), [n for _, n in langs], color="#4477aa")
    axes[0].set_xticks(range(len(langs)), [v for v, _ in langs], fontsize=7, rotation=45)
    axes[0].set_title("language (CLIP-scored samples)", fontsize=9)
    axes[1].bar(range(len(groups)), [n for _, n in groups], color="#ddaa33")
    axes[1].set_xticks(range(len(groups)), [v for v, _ in groups], fontsize=7)
    axes[1].set_title("language group", fontsize=9)
    _save(fig, uri)


def _grid_chart(samples: list[dict[str, Any]], thumbs: dict[str, Any], uri: str, title: str) -> int:
    shown = [s for s in samples if s["key"] in thumbs]
    cols = 4
    rows = max(1, math.ceil(len(shown) / cols))
    fig = _figure(cols * 2.0, rows * 2.3 + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, shown):
        ax.imshow(thumbs[s["key"]])
        sim = "-" if s["similarity"] is None else f"{s['similarity']:.2f}"
        caption = (s["caption"] or "").replace("\n", " ")
        label = f"sim {sim} {s['outcome'].replace('drop:', '')}\n{caption[:30]}"
        ax.set_title(label, fontsize=6, parse_math=False)
    if not shown:
        axes[0][0].text(0.5, 0.5, "no samples to show", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle(title, fontsize=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs missing from the default font (CJK captions)
        _save(fig, uri)
    return len(shown)


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


def _lineage_sections(rows: list[FunnelRow]) -> dict[str, dict[str, int]]:
    stages: dict[str, dict[str, int]] = {}
    for r in rows:
        stages.setdefault(r.stage, {})[r.outcome] = r.count
    return stages


def _passed(outcomes: Mapping[str, int]) -> int:
    return sum(v for k, v in outcomes.items() if k in PASS_OUTCOMES)


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
