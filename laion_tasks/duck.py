"""The one DuckDB setup of the stages: in memory, spilling to a local directory, within a memory budget."""

from __future__ import annotations

from pathlib import Path

import duckdb

from laion_tasks.config import memory_bytes

DUCKDB_SHARE = 0.75
"""DuckDB's part of a step's memory budget; the Arrow batches and numpy arrays of the step use the rest."""


def connect(
    memory_limit: str, spill_dir: Path, threads: int | None = None, *, ordered: bool = True
) -> duckdb.DuckDBPyConnection:
    """A connection for one step that needs ``memory_limit`` at most (``"4GiB"``), spilling to ``spill_dir``.

    ``ordered=False`` lets DuckDB drop insertion order where a query does not ask for one (less memory).
    """
    spill_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(":memory:")
    # duckdb 2 keeps an execute() result open until fetched: fetch every statement's result
    con.execute(f"SET memory_limit = '{int(memory_bytes(memory_limit) * DUCKDB_SHARE) // 2**20}MiB'").fetchall()
    con.execute("SET temp_directory = '" + str(spill_dir).replace("'", "''") + "'").fetchall()
    if not ordered:
        con.execute("SET preserve_insertion_order = false").fetchall()
    if threads:
        con.execute(f"SET threads = {int(threads)}").fetchall()
    return con
