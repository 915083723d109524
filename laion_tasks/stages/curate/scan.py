"""Curate's one scan: every sample's base outcome and subset flags, the subset rules, the opt-outs
and dedup within each subset, and the counts."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any


from laion_tasks import storage
from laion_tasks.config import ClipConfig, CurateConfig, SubsetConfig
from laion_tasks.net.usage_prefs import ROW_FIELDS
from laion_tasks.snapshot_db import (  # noqa: F401 - eligibility is defined with the samples view
    BASE_OUTCOMES,
    ELIGIBLE,
    base_checks,
    base_outcome_sql,
    eligible_sql,
)
from laion_tasks.snapshot_db import SAMPLES_VIEW, SnapshotDB, open_snapshot, predicate_columns
from laion_tasks.stage import StageError
from laion_tasks.stages.subset_rules import apply_rules
from laion_tasks.stages.curate.columns import (
    _NULL_HINTS,
    LAION_COLUMNS,
    LAION_COLUMNS_SQL,
)

log = logging.getLogger(__name__)


@dataclass
class SubsetCounts:
    """Counts of a snapshot against the configured subsets, from one scan."""

    base: dict[str, int]
    """Samples per base outcome (``drop:...`` and ``eligible``); sums to the download rows."""
    matched: dict[str, int]
    """Eligible samples matching each subset's predicate."""
    duplicates: dict[str, int] = field(default_factory=dict)
    """Of those, the duplicates of another sample kept in the same subset."""
    snapshot_duplicates: int = 0
    """Eligible samples that dedup's snapshot-wide verdict names a duplicate (``dup_of``)."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Subset name -> why it cannot be computed."""
    rule_drops: dict[str, dict[str, int]] = field(default_factory=dict)
    """Of the matched samples, those each subset rule dropped (before dedup)."""
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Subset name -> what its rules decided (threshold and model, clusters hit, classes)."""
    usage_drops: dict[str, int] = field(default_factory=dict)
    """Of the matched samples, those whose publisher refuses one of the subset's ``intended_uses``."""

    @property
    def total(self) -> int:
        return sum(self.base.values())

    @property
    def eligible(self) -> int:
        return self.base.get(ELIGIBLE, 0)

    def outcomes(self, name: str) -> dict[str, int]:
        """Per-sample outcomes for one subset; they sum to :attr:`total`."""
        out = {k: v for k, v in self.base.items() if k != ELIGIBLE and v}
        if name in self.unavailable:
            out["drop:unavailable"] = self.eligible
        else:
            matched, duplicates = self.matched.get(name, 0), self.duplicates.get(name, 0)
            ruled = self.rule_drops.get(name, {})
            refused = self.usage_drops.get(name, 0)
            out["drop:predicate"] = self.eligible - matched
            out["drop:usage_pref"] = refused
            out.update(ruled)
            out["drop:duplicate"] = duplicates
            out["kept"] = matched - refused - sum(ruled.values()) - duplicates
        return {k: v for k, v in out.items() if v}


def _validated_columns(db: SnapshotDB, name: str, subset: SubsetConfig) -> set[str]:
    try:
        columns = predicate_columns(db.con, subset.where)
    except ValueError as exc:
        raise StageError(f"subset {name}: {exc}") from exc
    known = set(db.columns)
    unknown = sorted(columns - known)
    if unknown:
        raise StageError(
            f"subset {name}: predicate {subset.where!r} uses unknown column(s) {unknown}; "
            f"available: {sorted(known)}"
        )
    try:
        db.con.execute(f"SELECT count(*) FROM (SELECT * FROM {SAMPLES_VIEW} LIMIT 0) WHERE ({subset.where})")
    except Exception as exc:  # duckdb binder/type errors
        raise StageError(f"subset {name}: predicate {subset.where!r} is invalid: {exc}") from exc
    return columns


def _tally(
    rows: list[tuple], subsets: dict[str, SubsetConfig], columns: list[str], columns_by_subset: dict[str, set[str]], config: CurateConfig
) -> SubsetCounts:
    """Turn the per-base-outcome rows of a scan (count, one match count per subset, one non-NULL count
    per predicate column) into counts; a subset whose predicate column is NULL for every eligible
    sample is ``unavailable``, not silently empty."""
    base = {o: 0 for o in BASE_OUTCOMES if o != "drop:clip_filtered" or config.require_clip_kept}
    matched = {name: 0 for name in subsets}
    nonnull_eligible = {c: 0 for c in columns}
    for row in rows:
        base[row[0]] = int(row[1])
        if row[0] != ELIGIBLE:
            continue
        for i, name in enumerate(subsets):
            matched[name] = int(row[2 + i])
        for i, c in enumerate(columns):
            nonnull_eligible[c] = int(row[2 + len(subsets) + i])
    eligible = base[ELIGIBLE]
    unavailable: dict[str, str] = {}
    for name, cols in columns_by_subset.items():
        empty = sorted(c for c in cols if nonnull_eligible[c] == 0)
        if eligible and empty:
            hints = "; ".join(_NULL_HINTS[c] for c in empty if c in _NULL_HINTS)
            unavailable[name] = (
                f"column(s) {', '.join(empty)} are NULL for all {eligible} eligible samples"
                + (f": {hints}" if hints else "")
            )
    return SubsetCounts(base=base, matched=matched, unavailable=unavailable)


def count_subsets(db: SnapshotDB, subsets: dict[str, SubsetConfig], config: CurateConfig) -> SubsetCounts:
    """Base outcomes, per-subset matches and duplicates, from the same scan a curate run does."""
    try:
        return _scan_snapshot(db, subsets, config)[0]
    finally:
        db.con.execute(f"DROP TABLE IF EXISTS {SCAN_TABLE}")


def subset_counts(
    root: str, snapshot: str, config: CurateConfig, *, db: SnapshotDB | None = None, clip: ClipConfig | None = None
) -> SubsetCounts:
    """Counts for every configured subset without writing anything (for the card and `laion curate --dry-run`)."""
    if db is not None:
        return count_subsets(db, config.subsets, config)
    with open_snapshot(root, snapshot, config, clip) as own:
        return count_subsets(own, config.subsets, config)


SCAN_TABLE = "curate_scan"


def _scan_snapshot(db: SnapshotDB, subsets: dict[str, SubsetConfig], config: CurateConfig) -> tuple[SubsetCounts, list[str]]:
    """The one scan of a run: materialise what every subset needs into ``curate_scan``; count from it.

    Per sample: its base outcome, one flag per subset (``s0``, ``s1``, ...) and one non-NULL flag per
    predicate column; the LAION columns only for eligible samples that enter some subset (NULL
    otherwise, which DuckDB stores for almost nothing). The table lives in DuckDB's buffer pool
    and spills to the temp directory beyond ``duckdb_memory_limit``.
    """
    columns_by_subset = {name: _validated_columns(db, name, s) for name, s in subsets.items()}
    columns = sorted(set().union(*columns_by_subset.values())) if subsets else []
    flags = [f"coalesce(({s.where}), false) AS s{i}" for i, s in enumerate(subsets.values())]
    nonnull = [f"{c} IS NOT NULL AS n{i}" for i, c in enumerate(columns)]
    any_subset = " OR ".join(f"s{i}" for i in range(len(subsets))) or "false"
    keep = f"base_outcome = '{ELIGIBLE}' AND ({any_subset})"
    laion = ", ".join(f'CASE WHEN {keep} THEN "{c}" END AS "{c}"' for c in LAION_COLUMNS)
    inner = ", ".join(["base_outcome", *[f"s{i}" for i in range(len(subsets))], *[f"n{i}" for i in range(len(columns))]])
    db.con.execute(f"DROP TABLE IF EXISTS {SCAN_TABLE}")
    db.con.execute(
        f"""
        CREATE TEMP TABLE {SCAN_TABLE} AS
        SELECT {inner}, {keep} AS keep, CASE WHEN {keep} THEN shard END AS _shard, {laion},
               CASE WHEN {keep} THEN dedup_rank END AS _rank, CASE WHEN {keep} THEN dedup_ua1 END AS _ua1,
               CASE WHEN {keep} THEN dedup_ua2 END AS _ua2, CASE WHEN {keep} THEN dedup_sh1 END AS _sh1,
               CASE WHEN {keep} THEN dedup_sh2 END AS _sh2, {keep} AND dup_of IS NOT NULL AS _dup,
               dup_of IS NOT NULL AS _dup_any, CASE WHEN {keep} THEN usage_pref END AS _usage
        FROM (
          SELECT {base_outcome_sql(config)} AS base_outcome, {", ".join(flags + nonnull) or "NULL AS _none"},
                 shard, {LAION_COLUMNS_SQL}, dedup_rank, dedup_ua1, dedup_ua2, dedup_sh1, dedup_sh2, dup_of, usage_pref
          FROM (SELECT *, ('0x' || substr(sha256(coalesce(url, '') || coalesce(caption, '')), 1, 16))::UBIGINT AS h64
                FROM {SAMPLES_VIEW})
        )
        """
    )
    sums = [f"count_if(s{i})" for i in range(len(subsets))] + [f"count_if(n{i})" for i in range(len(columns))]
    rows = db.con.execute(
        f"SELECT base_outcome, {', '.join(['count(*)'] + sums)} FROM {SCAN_TABLE} GROUP BY base_outcome"
    ).fetchall()
    counts = _tally(rows, subsets, columns, columns_by_subset, config)
    counts.snapshot_duplicates = int(db.con.execute(
        f"SELECT count(*) FROM {SCAN_TABLE} WHERE base_outcome = '{ELIGIBLE}' AND _dup_any").fetchall()[0][0])
    counts.usage_drops = _drop_refused_uses(db, subsets, skip=set(counts.unavailable))  # narrows s<i>, before the rules
    ruled = apply_rules(db, SCAN_TABLE, subsets, config, skip=set(counts.unavailable))  # narrows s<i> before dedup
    counts.rule_drops, counts.rules = {n: r.drops for n, r in ruled.items()}, {n: r.record for n, r in ruled.items()}
    counts.duplicates = _dedup_within_subsets(db, list(subsets))
    return counts, [f"s{i}" for i in range(len(subsets))]


def _drop_refused_uses(db: SnapshotDB, subsets: dict[str, SubsetConfig], skip: set[str]) -> dict[str, int]:
    """Clear the flag ``s<i>`` of every eligible sample whose ``usage_pref`` says ``n`` for one of subset i's
    ``intended_uses`` (``drop:usage_pref``); return how many each subset lost. Rows the download stage
    already refused (``download.usage_pref_refuse``) never get here: they are ``drop:not_downloaded``."""
    out: dict[str, int] = {}
    for i, (name, subset) in enumerate(subsets.items()):
        if name in skip or not subset.intended_uses:
            continue
        refused = " OR ".join(f"_usage.{ROW_FIELDS[use]} = 'n'" for use in subset.intended_uses)
        cond = f"base_outcome = '{ELIGIBLE}' AND s{i} AND coalesce({refused}, false)"
        out[name] = int(db.con.execute(f"SELECT count(*) FROM {SCAN_TABLE} WHERE {cond}").fetchall()[0][0])
        if out[name]:
            db.con.execute(f"UPDATE {SCAN_TABLE} SET s{i} = false WHERE {cond}")
    return out


def _dedup_within_subsets(db: SnapshotDB, names: list[str]) -> dict[str, int]:
    """Clear the flag ``s<i>`` of every sample that is a duplicate of another sample of subset i.

    Dedup's rules run on the subset's own rows (eligible and matching), so the representative of a
    group is always a member of the subset when any member is. Without dedup's ranks (dedup not run,
    or written by an older version), dedup's snapshot-wide verdict (``dup_of``) stands.
    """
    from laion_tasks.stages.dedup import pairs_uri, resolve_verdicts, work_dir_for

    out: dict[str, int] = {}
    eligible = f"base_outcome = '{ELIGIBLE}'"
    has_ranks = db.con.execute(f"SELECT count(_rank) > 0 FROM {SCAN_TABLE}").fetchall()[0][0]
    pairs = pairs_uri(work_dir_for(db.root, db.snapshot))
    with contextlib.ExitStack() as stack:
        if has_ranks and storage.exists(pairs):
            local = str(stack.enter_context(storage.local_copy(pairs))).replace("'", "''")
            edges = f"SELECT rank, dup FROM read_parquet('{local}')"
        else:
            edges = "SELECT NULL::BIGINT AS rank, NULL::BIGINT AS dup WHERE false"
        for i, _name in enumerate(names):
            flag = f"s{i}"
            if has_ranks:
                resolve_verdicts(db.con, f"SELECT _rank AS rank, _ua1 AS ua1, _ua2 AS ua2, _sh1 AS sh1, _sh2 AS sh2 "
                                         f"FROM {SCAN_TABLE} WHERE {eligible} AND {flag}", edges)
                dropped = "_rank IN (SELECT rank FROM dd)"
            else:
                dropped = "_dup"
            n = db.con.execute(f"SELECT count(*) FROM {SCAN_TABLE} WHERE {eligible} AND {flag} AND {dropped}").fetchall()[0][0]
            db.con.execute(f"UPDATE {SCAN_TABLE} SET {flag} = false WHERE {eligible} AND {flag} AND {dropped}")
            out[_name] = int(n)
    db.con.execute(f"UPDATE {SCAN_TABLE} SET keep = false WHERE keep AND NOT ({' OR '.join(f's{i}' for i in range(len(names))) or 'false'})")
    return out
