"""Regroup extract's candidate Parquets into fixed-size download shards.

Deterministic: input URIs are sorted, rows are streamed in file order and a shard is
cut every ``shard_size`` rows, so a re-run writes byte-identical shards with the same
names and the same per-sample ``key`` (``<shard><row:05d>``, unique within a snapshot).
Rows are streamed batch by batch; the candidates are never all in memory.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import storage
from laion_tasks.layout import shard_name
from laion_tasks.stage import StageError

KEY_ROW_DIGITS = 5
"""Row digits in a sample key: shards hold at most 10**5 rows."""


def sample_key(shard: str, row: int) -> str:
    return f"{shard}{row:0{KEY_ROW_DIGITS}d}"


def _batches(uri: str, batch_size: int) -> Iterator[pa.RecordBatch]:
    with storage.local_copy(uri) as path:
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several error types
            raise StageError(f"candidates {uri}: not a readable Parquet file: {exc}") from exc
        yield from parquet.iter_batches(batch_size=batch_size)


def _write_shard(uri: str, table: pa.Table) -> None:
    with storage.atomic_local_path(uri, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")


def make_download_shards(candidate_uris: list[str], shards_dir: str, shard_size: int) -> list[str]:
    """Cut the candidates into shards of ``shard_size`` rows; returns the shard URIs in order."""
    if not 0 < shard_size <= 10**KEY_ROW_DIGITS:
        raise ValueError(f"shard_size must be in 1..{10**KEY_ROW_DIGITS}, got {shard_size}")
    schema: pa.Schema | None = None
    pending: list[pa.Table] = []
    pending_rows = 0
    out: list[str] = []

    def flush(rows: int) -> None:
        nonlocal pending, pending_rows
        table = pa.concat_tables(pending).combine_chunks() if len(pending) > 1 else pending[0]
        shard_table, rest = table.slice(0, rows), table.slice(rows)
        shard = shard_name(len(out))
        keys = pa.array([sample_key(shard, i) for i in range(shard_table.num_rows)], pa.string())
        if "key" in shard_table.column_names:
            shard_table = shard_table.drop_columns(["key"])
        shard_table = shard_table.add_column(0, "key", keys)
        uri = storage.join(shards_dir, f"{shard}.parquet")
        _write_shard(uri, shard_table)
        out.append(uri)
        pending = [rest] if rest.num_rows else []
        pending_rows = rest.num_rows

    for uri in sorted(candidate_uris):
        for batch in _batches(uri, batch_size=min(shard_size, 65_536)):
            table = pa.Table.from_batches([batch])
            if schema is None:
                schema = table.schema
            elif not table.schema.equals(schema):
                try:
                    table = table.select(schema.names).cast(schema)
                except (KeyError, pa.ArrowInvalid, ValueError) as exc:
                    raise StageError(f"candidates {uri}: schema {table.schema} does not match {schema}") from exc
            pending.append(table)
            pending_rows += table.num_rows
            while pending_rows >= shard_size:
                flush(shard_size)
    if pending_rows:
        flush(pending_rows)
    return out
