"""Regroup extract's candidate Parquets into fixed-size download shards.

Deterministic: input URIs are sorted, rows are streamed in file order and a shard is
cut every ``shard_size`` rows, so a re-run writes byte-identical shards with the same
names and the same per-sample ``key`` (``<shard><row:05d>``, unique within a snapshot).
Rows are streamed batch by batch; the candidates are never all in memory.

Incremental plans (:func:`plan_download_shards`) keep shard contents stable: a manifest
records which candidate files (and their checksums) the shards were cut from. When new
candidate files appear (more WAT files) and the old ones are unchanged, only the new
files are cut, into new shards after the last one, so every existing shard keeps its
content and its downloads. When an old candidate file changed or vanished, the whole
plan is recut. Each shard's checksum is part of the download stage's skip key, so no
shard is ever skipped with stale content either way.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import layout, storage
from laion_tasks.layout import shard_name
from laion_tasks.stage import StageError

if TYPE_CHECKING:
    from laion_tasks.runner import Context

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


def _write_shard(uri: str, table: pa.Table) -> str:
    with storage.atomic_local_path(uri, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
        return storage.file_sha256(tmp)


def make_download_shards(candidate_uris: list[str], shards_dir: str, shard_size: int) -> list[str]:
    """Cut the candidates into shards of ``shard_size`` rows; returns the shard URIs in order."""
    return [storage.join(shards_dir, f"{s}.parquet") for s in cut_download_shards(candidate_uris, shards_dir, shard_size)]


def cut_download_shards(candidate_uris: list[str], shards_dir: str, shard_size: int, first_index: int = 0) -> dict[str, str]:
    """Cut the candidates into shards of ``shard_size`` rows numbered from ``first_index``; shard id -> sha256."""
    if not 0 < shard_size <= 10**KEY_ROW_DIGITS:
        raise ValueError(f"shard_size must be in 1..{10**KEY_ROW_DIGITS}, got {shard_size}")
    schema: pa.Schema | None = None
    pending: list[pa.Table] = []
    pending_rows = 0
    out: dict[str, str] = {}

    def flush(rows: int) -> None:
        nonlocal pending, pending_rows
        table = pa.concat_tables(pending).combine_chunks() if len(pending) > 1 else pending[0]
        shard_table, rest = table.slice(0, rows), table.slice(rows)
        shard = shard_name(first_index + len(out))
        keys = pa.array([sample_key(shard, i) for i in range(shard_table.num_rows)], pa.string())
        if "key" in shard_table.column_names:
            shard_table = shard_table.drop_columns(["key"])
        shard_table = shard_table.add_column(0, "key", keys)
        uri = storage.join(shards_dir, f"{shard}.parquet")
        out[shard] = _write_shard(uri, shard_table)
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


# -- the download plan ------------------------------------------------------------------


def read_plan(ctx: "Context") -> dict:
    """The download plan: {"shard_size", "candidates": {wat id: checksum}, "shards": {shard id: checksum}}."""

    def load() -> dict:
        uri = _manifest_uri(ctx)
        return json.loads(storage.read_text(uri)) if storage.exists(uri) else {"candidates": {}, "shards": {}}

    return ctx.resource("download_plan", load)


def download_shard_ids(ctx: "Context") -> list[str]:
    return sorted(read_plan(ctx)["shards"])


def shard_checksum(ctx: "Context", shard: str) -> str:
    return str(read_plan(ctx)["shards"].get(shard, "missing"))


def _manifest_uri(ctx: "Context") -> str:
    return ctx.uri("shards_manifest", layout.shards_manifest_uri(ctx.root, ctx.snapshot))


def _candidate_files(ctx: "Context") -> dict[str, str]:
    """wat id -> its candidates file, for the WAT files of the current extract plan; or, with the
    ``candidate_uris`` option (``laion regroup FILES --shards-dir D``), each named file by its URI."""
    from laion_tasks.runner import spec

    if ctx.options.get("candidate_uris"):
        return {uri: uri for uri in ctx.options["candidate_uris"]}
    return {wat: layout.candidates_uri(ctx.root, ctx.snapshot, wat) for wat in spec("extract").shards(ctx)}


def _candidate_checksums(ctx: "Context") -> dict[str, str]:
    """wat id -> checksum of its candidates file, for the extracted WAT files of the current plan."""
    recorded = {r["shard_id"]: r["checksum"] for r in ctx.lineage.current_runs(ctx.snapshot, ["extract"])} if ctx.lineage else {}
    out: dict[str, str] = {}
    for wat, uri in _candidate_files(ctx).items():
        if not storage.exists(uri):
            continue  # not extracted (yet): a later plan appends it
        checksum = recorded.get(wat)
        if not checksum:
            with storage.local_copy(uri) as path:
                checksum = storage.file_sha256(path)
        out[wat] = checksum
    return out


def plan_download_shards(ctx: "Context") -> list[str]:
    """Cut new candidate files into new shards (or recut all when old ones changed); write the manifest."""
    root, snapshot = ctx.root, ctx.snapshot
    size = ctx.settings.download.shard_size
    shards_dir = ctx.uri("shards_dir", layout.shards_dir(root, snapshot))
    old = read_plan(ctx)
    current = _candidate_checksums(ctx)
    stable = old.get("shard_size") == size and all(current.get(w) == c for w, c in old["candidates"].items())
    if stable:
        new = sorted(w for w in current if w not in old["candidates"])
        shards = dict(old["shards"])
        first = max((int(s) + 1 for s in shards), default=0)
    else:
        new, shards, first = sorted(current), {}, 0
    if new:
        files = _candidate_files(ctx)
        uris = [files[w] for w in new]
        shards.update(cut_download_shards(uris, shards_dir, size, first_index=first))
    if not stable:
        for uri in storage.list_uris(shards_dir, ".parquet"):
            if uri.rsplit("/", 1)[-1].removesuffix(".parquet") not in shards:
                storage.delete(uri)
    plan = {"shard_size": size, "candidates": current, "shards": dict(sorted(shards.items()))}
    storage.write_text(_manifest_uri(ctx), json.dumps(plan, indent=1, sort_keys=True))
    ctx.forget("download_plan")
    return sorted(shards)
