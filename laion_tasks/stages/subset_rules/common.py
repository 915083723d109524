"""What the subset rules share: their outcomes, and narrowing a subset's flag in the scan table."""

from __future__ import annotations

import logging
from typing import Any


from laion_tasks.snapshot_db import SnapshotDB

log = logging.getLogger(__name__)

RULE_OUTCOMES = ("drop:text_language", "drop:text_class", "drop:clip_score", "drop:image_cluster")
"""Per-sample outcomes of the rules, in the order they are checked."""
SIMILARITY = "similarity"
REUSE_FACTOR = 2.0
"""Dedup's clusters are reused when their mean size is within this factor of ``image_cluster_size``."""
_MEMBERS = "subset_rule_members"


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
