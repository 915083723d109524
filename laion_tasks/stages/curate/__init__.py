"""Curate: evaluate each configured subset's predicate over a snapshot, out of core.

Who enters a subset (checked in this order; the first failing check is the sample's
drop reason, so every download row lands in exactly one outcome):

1. ``drop:not_downloaded``   download ``status`` is not ``'success'``;
2. ``drop:not_clip_scored``  no CLIP similarity (no clip row, or no_image / decode_error / empty_caption);
3. ``drop:clip_filtered``    below the CLIP threshold of the model that scored it (``clip.english.threshold``
                             or ``clip.multilingual.threshold``, applied here, not in the GPU stage), when
                             ``curate.require_clip_kept`` (default: LAION subsets are subsets of LAION-5B);
4. ``drop:hashlist_blocked`` the tag stage matched a URL / image hash list;
5. ``drop:predicate``        the subset predicate is not true (NULL counts as false);
   ``drop:usage_pref``        the publisher refuses one of the subset's ``intended_uses`` (the ``usage_pref``
                             the download stage recorded: AIPREF ``Content-Usage``, ``Content-Signal``);
   then the subset's DataComp rules, if set (``drop:text_language``, ``drop:text_class``,
   ``drop:clip_score``, ``drop:image_cluster``: :mod:`laion_tasks.stages.subset_rules`);
6. ``drop:duplicate``        a duplicate of a sample kept *in this subset*: dedup's rules
                             (:func:`laion_tasks.stages.dedup.resolve_verdicts`) applied to the rows
                             that pass 1-5, so a duplicate group keeps one member in every subset
                             that any of its members qualifies for;
7. ``kept``.

A subset whose predicate reads a column that is NULL for every eligible sample
(``aesthetic_score`` without aesthetic weights) is ``unavailable``: the eligible rows
count as ``drop:unavailable``, the manifest says why, and no data files are written.

Output under ``subsets/<name>/``: ``part-NNNNN.parquet`` in LAION's column layout (see
:data:`LAION_COLUMNS_SQL`), ordered by (shard, key), ``rows_per_file`` rows each;
optionally ``webdataset/NNNNN.tar`` + ``sizes.json`` for open_clip; and last
``manifest.json``, the commit point (deleted first, so a crash leaves none).
"""


from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Any

from laion_tasks import layout, storage
from laion_tasks.config import ClipConfig, CurateConfig, SubsetConfig
from laion_tasks.snapshot_db import (
    BASE_OUTCOMES,
    ELIGIBLE,
    SnapshotDB,
    base_checks,
    base_outcome_sql,
    eligible_sql,
    open_snapshot,
)
from laion_tasks.stage import Context, ShardStats, StageError, StageSpec
from laion_tasks.stages.curate.columns import HASH_DEFINITION, LAION_COLUMNS, MANIFEST, WDS_DIR, laion_hash
from laion_tasks.stages.curate.scan import SCAN_TABLE, SubsetCounts, _scan_snapshot, count_subsets, subset_counts
from laion_tasks.stages.curate.writers import _remove_stale, _write_parquet_parts, _write_webdataset

__all__ = [  # what the card, verify, tests and benchmarks use, from the module of each role
    "BASE_OUTCOMES", "ELIGIBLE", "HASH_DEFINITION", "LAION_COLUMNS", "SPEC", "SubsetCounts", "base_checks",
    "base_outcome_sql", "count_subsets", "curate_snapshot", "curate_subset", "curate_subsets", "eligible_sql",
    "laion_hash", "read_manifest", "subset_counts",
]

log = logging.getLogger(__name__)


def curate_subsets(db: SnapshotDB, subsets: dict[str, SubsetConfig], config: CurateConfig) -> dict[str, ShardStats]:
    """Write several subsets from one scan of the snapshot; return each one's per-sample outcomes.

    Each subset's outcomes sum to the snapshot's download rows. ``stats.extra`` holds
    ``status`` (``ok`` | ``unavailable``), ``reason``, ``rows`` and the files.
    """
    root, snapshot = db.root, db.snapshot
    out_dirs = {name: layout.subset_dir(root, snapshot, name) for name in subsets}
    for out_dir in out_dirs.values():
        manifest_uri = storage.join(out_dir, MANIFEST)
        if storage.exists(manifest_uri):
            storage.delete(manifest_uri)  # until the new manifest lands, the subset reads as not done
    counts, flag_names = _scan_snapshot(db, subsets, config)
    flags = dict(zip(subsets, flag_names))
    available = [n for n in subsets if n not in counts.unavailable]
    parts = _write_parquet_parts(db, {n: out_dirs[n] for n in available}, flags, config) if available else {}
    results: dict[str, ShardStats] = {}
    for name, subset in subsets.items():
        out_dir = out_dirs[name]
        outcomes = counts.outcomes(name)
        stats = ShardStats(counts=Counter(outcomes))
        manifest: dict[str, Any] = {
            "subset": name,
            "snapshot": snapshot,
            "where": subset.where,
            "description": subset.description,
            "require_clip_kept": config.require_clip_kept,
            "intended_uses": list(subset.intended_uses),
            "counts": dict(sorted(outcomes.items())),
            "total_samples": counts.total,
            **({"rules": counts.rules[name]} if name in counts.rules else {}),
        }
        keep: set[str] = set()
        if name in counts.unavailable:
            manifest.update(status="unavailable", reason=counts.unavailable[name], rows=0, parquet=[])
            log.warning("subset %s unavailable: %s", name, counts.unavailable[name])
        else:
            written = parts[name]
            rows = sum(p["rows"] for p in written)
            if rows != outcomes.get("kept", 0):
                raise StageError(f"subset {name}: wrote {rows} rows but counted {outcomes.get('kept', 0)} kept samples")
            keep |= {p["name"] for p in written}
            stats.bytes_written += sum(p["bytes"] for p in written)
            manifest.update(
                status="ok",
                reason=None,
                rows=rows,
                columns=LAION_COLUMNS,
                hash=HASH_DEFINITION,
                parquet=[{"name": p["name"], "rows": p["rows"]} for p in written],
            )
            if subset.write_images:
                wds = _write_webdataset(db, out_dir, flags[name], config)
                keep |= {f"{WDS_DIR}/{s['name']}" for s in wds["shards"]} | {f"{WDS_DIR}/sizes.json"}
                stats.bytes_written += wds.pop("bytes")
                manifest["webdataset"] = wds
        _remove_stale(out_dir, keep)
        blob = json.dumps(manifest, indent=2, sort_keys=True).encode()
        manifest_uri = storage.join(out_dir, MANIFEST)
        storage.write_bytes(manifest_uri, blob)
        stats.output_uri = manifest_uri
        stats.checksum = hashlib.sha256(blob).hexdigest()
        stats.extra = {
            "status": manifest["status"],
            "reason": manifest["reason"],
            "rows": manifest["rows"],
            "files": len(manifest["parquet"]),
            **({"webdataset_samples": manifest["webdataset"]["samples"]} if "webdataset" in manifest else {}),
        }
        results[name] = stats
    db.con.execute(f"DROP TABLE IF EXISTS {SCAN_TABLE}")
    return results


def curate_subset(
    root: str,
    snapshot: str,
    name: str,
    subset: SubsetConfig,
    config: CurateConfig,
    *,
    db: SnapshotDB | None = None,
    clip: ClipConfig | None = None,
) -> ShardStats:
    """Write one subset (see :func:`curate_subsets`); ``clip`` gives the CLIP thresholds."""
    if db is None:
        with open_snapshot(root, snapshot, config, clip) as own:
            return curate_subsets(own, {name: subset}, config)[name]
    return curate_subsets(db, {name: subset}, config)[name]


def curate_snapshot(
    root: str, snapshot: str, config: CurateConfig, names: list[str] | None = None, *, clip: ClipConfig | None = None
) -> dict[str, ShardStats]:
    """Every (or the named) configured subset: one metadata copy, one scan."""
    chosen = names or list(config.subsets)
    unknown = [n for n in chosen if n not in config.subsets]
    if unknown:
        raise StageError(f"unknown subset(s) {unknown}; configured: {sorted(config.subsets)}")
    with open_snapshot(root, snapshot, config, clip) as db:
        return curate_subsets(db, {n: config.subsets[n] for n in chosen}, config)


def read_manifest(root: str, snapshot: str, name: str) -> dict[str, Any] | None:
    """A subset's manifest, or None when it was never (or not completely) written."""
    uri = storage.join(layout.subset_dir(root, snapshot, name), MANIFEST)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


# -- the stage's declaration ---------------------------------------------------------


def _run_curate(ctx: Context, name: str) -> ShardStats:
    """One scan per batch: the first subset that runs writes every configured subset (those
    that were current are rewritten identically), the others take their stats from it."""
    config = ctx.settings.curate
    if name not in config.subsets:
        raise StageError(f"unknown subset {name!r}; configured: {sorted(config.subsets)}")
    written: dict[str, ShardStats] = ctx.resource("curated_subsets", dict)
    if name not in written:
        db = ctx.resource("snapshot_db", lambda: open_snapshot(ctx.root, ctx.snapshot, config, ctx.settings.clip))
        written.update(curate_subsets(db, {n: s for n, s in config.subsets.items() if n not in written}, config))
    return written[name]


SPEC = StageSpec(
    name="curate",
    mapped=False,  # one task curates every subset from one scan
    publishes=lambda settings: list(settings.curate.subsets),
    reads=("download", "clip", "tag", "dedup"),
    # one shard per subset: its own predicate, the shared rules, and the CLIP thresholds applied here
    result_fields=(
        "curate.subsets.{shard}",
        "curate.require_clip_kept",
        "curate.rows_per_file",
        "curate.samples_per_tar",
        "clip.*.threshold",
        # the image rule embeds an ImageFolder target set with the English model (subset_rules)
        "clip.english.model", "clip.english.pretrained", "clip.english.checkpoint", "clip.device", "clip.seed",
    ),
    output=lambda ctx, name: storage.join(layout.subset_dir(ctx.root, ctx.snapshot, name), MANIFEST),
    run_shard=_run_curate,
    shards=lambda ctx: list(ctx.settings.curate.subsets),
    plan_name="subsets",
    section="curate",
    after_batch=lambda ctx, shards: {"subsets": {n: r.get("extra", {}) for n, r in shards.items()}},
)
