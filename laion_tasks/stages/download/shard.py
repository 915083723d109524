"""Shard I/O of the download stage: read a shard, write its WebDataset tar and status Parquet.

One shard in, two objects out:

- ``<shard>.tar``: ``KEY.jpg`` (or ``.webp``), ``KEY.txt`` (caption), ``KEY.json`` per success,
  readable by ``webdataset`` and open_clip's training loader. Members are in completion
  order (writing as results arrive keeps memory bounded).
- ``<shard>.parquet``: EVERY input row, in input order, with the input columns plus
  ``caption`` and ``status``/``error_message``/sizes/``mime_type``/``sha256``/``final_url``, and
  ``usage_pref``: the AI-use preferences found for the sample (a struct: ``train_ai``, ``ai_input``,
  ``search`` each ``y``/``n``/NULL, the ``sources`` they came from, RSL ``licenses``; NULL when none).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import storage
from laion_tasks.config import DownloadConfig
from laion_tasks.net.origin_cache import SharedOriginStore
from laion_tasks.progress import Progress, shard_label
from laion_tasks.stage import read_parquet, ShardStats, StageError
from laion_tasks.net.usage_prefs import ROW_FIELDS, UsagePref
from laion_tasks.stages.download.fetch import SUCCESS, USAGE_REFUSAL_STATUSES, Blocklist, SampleResult, is_retryable
from laion_tasks.stages.download.workers import RunOutcome, download_rows
from laion_tasks.stages.image_ops import ImageResult
from laion_tasks.stages.regroup import sample_key

TAR_MTIME = 1_700_000_000
"""Fixed tar member mtime, so the same results give the same tar bytes. An int: a float mtime
makes tarfile add a PAX header block pair to every member (slower, ~1.5 KB more per sample)."""

USAGE_PREF_TYPE = pa.struct(
    [*((name, pa.string()) for name in ROW_FIELDS.values()), ("sources", pa.list_(pa.string())),
     ("licenses", pa.list_(pa.string()))]
)
"""``usage_pref`` (:meth:`laion_tasks.net.usage_prefs.UsagePref.to_row`; DuckDB: ``usage_prefs.SQL_TYPE``)."""

RESULT_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("original_bytes", pa.int64()),
        ("mime_type", pa.string()),
        ("sha256", pa.string()),
        ("final_url", pa.string()),
        ("usage_pref", USAGE_PREF_TYPE),
    ]
)


class SampleTar:
    """Writes WebDataset samples: the bytes ``webdataset.TarWriter`` writes (same names, order, owner, mode and
    fixed mtime), so re-runs give byte-identical tars.

    Not webdataset's own writer: importing webdataset imports torch, seconds of CPU in every download process.
    The file is written in place (``"w"`` mode), not through tarfile's stream buffer, which copies its whole
    pending buffer on each write.
    """

    def __init__(self, handle: Any) -> None:
        # USTAR: for our short ASCII names, exactly the bytes PAX (webdataset's) writes, without its per-member check.
        self.tarstream = tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT)

    def __enter__(self) -> "SampleTar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.tarstream.close()

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            payload = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), TAR_MTIME, 0o444
            info.uname = info.gname = "bigdata"
            self.tarstream.addfile(info, io.BytesIO(payload))


def _tar_writer(handle: Any) -> SampleTar:
    return SampleTar(handle)


def _write_sample(sink: SampleTar, ext: str, key: str, row: dict[str, Any], caption: str | None,
                  result: SampleResult) -> None:
    """One WebDataset sample: KEY.<ext> image, KEY.txt caption, KEY.json metadata."""
    assert result.image is not None and result.image.data is not None
    meta = json.dumps(_sample_json(key, row, caption, result)).encode()
    sink.write(key, {ext: result.image.data, "txt": (caption or "").encode(), "json": meta})


def _shard_keys(table: pa.Table, shard_uri: str) -> list[str]:
    if "key" in table.column_names:
        keys = table.column("key").to_pylist()
        if any(not k for k in keys) or len(set(keys)) != len(keys):
            raise StageError(f"shard {shard_uri}: column 'key' has empty or duplicate values")
        return [str(k) for k in keys]
    shard = os.path.basename(urlsplit(shard_uri).path).split(".", 1)[0]
    return [sample_key(shard, i) for i in range(table.num_rows)]


def _captions(table: pa.Table, shard_uri: str) -> list[str | None]:
    for name in ("caption", "alt", "TEXT", "text"):
        if name in table.column_names:
            return table.column(name).to_pylist()
    raise StageError(f"shard {shard_uri}: no caption column (expected 'alt' or 'caption')")


def _sample_json(key: str, row: dict[str, Any], caption: str | None, res: SampleResult) -> dict[str, Any]:
    image = res.image
    assert image is not None
    meta = {k: row[k] for k in ("uid", "url", "page_url", "record_date") if k in row}
    return {
        "key": key,
        **meta,
        "caption": caption,
        "status": SUCCESS,
        "width": image.width,
        "height": image.height,
        "original_width": image.original_width,
        "original_height": image.original_height,
        "original_bytes": image.original_bytes,
        "mime_type": image.mime_type,
        "sha256": image.sha256,
        "final_url": res.final_url,
    }


def _result_columns(captions: list[str | None], results: list[SampleResult]) -> dict[str, pa.Array]:
    def img(attr: str) -> list[Any]:
        return [getattr(r.image, attr) if r.image is not None else None for r in results]

    values = {
        "caption": captions,
        "status": [r.status for r in results],
        "error_message": [r.error_message for r in results],
        "width": img("width"),
        "height": img("height"),
        "original_width": img("original_width"),
        "original_height": img("original_height"),
        "original_bytes": [r.image.original_bytes if r.image is not None else None for r in results],
        "mime_type": img("mime_type"),
        "sha256": img("sha256"),
        "final_url": [r.final_url for r in results],
        "usage_pref": [r.usage_pref.to_row() if r.usage_pref is not None else None for r in results],
    }
    return {f.name: pa.array(values[f.name], f.type) for f in RESULT_SCHEMA}


def _with_results(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    table = table.drop_columns([c for c in columns if c in table.column_names])
    for name, array in columns.items():
        table = table.append_column(name, array)
    return table


def _stats_for(results: list[SampleResult], outcome: RunOutcome, parquet_uri: str) -> ShardStats:
    """Counts by outcome; the Parquet, written last, is the shard's commit object."""
    stats = ShardStats(output_uri=parquet_uri)
    usage: dict[str, int] = {}
    for r in results:
        stats.add(SUCCESS if r.status == SUCCESS else USAGE_REFUSAL_STATUSES.get(r.status) or f"fail:{r.status}")
        if r.usage_pref is not None and r.status == SUCCESS:  # kept rows that carry a preference, for the record
            for key in [f"{use}={value}" for use, value in r.usage_pref.values] + ["rsl_license"] * bool(r.usage_pref.licenses):
                usage[key] = usage.get(key, 0) + 1
    stats.extra.update({"retries": outcome.retries, "bytes_downloaded": outcome.bytes_downloaded})
    if usage:
        stats.extra["usage_pref_kept"] = dict(sorted(usage.items()))
    return stats


def download_shard(
    shard_uri: str,
    tar_uri: str,
    parquet_uri: str,
    config: DownloadConfig,
    blocklist: Blocklist | None = None,
    origin_store: SharedOriginStore | None = None,
) -> ShardStats:
    """Download every sample of a shard; write the tar, then the Parquet (both atomically).

    Idempotent: a re-run rewrites both objects from scratch. The Parquet is written last,
    so its presence means the shard finished. ``origin_store``: the task's robots.txt /
    tdmrep.json answers, shared across its shards (the stage passes one per task).
    """
    started = time.time()
    table = read_parquet(shard_uri, "shard")
    if "url" not in table.column_names:
        raise StageError(f"shard {shard_uri}: no 'url' column")
    keys = _shard_keys(table, shard_uri)
    captions = _captions(table, shard_uri)
    urls = table.column("url").to_pylist()
    rows = table.select([c for c in ("uid", "url", "page_url", "record_date") if c in table.column_names]).to_pylist()
    ext = config.encode_format
    with storage.atomic_local_path(tar_uri, suffix=".tar") as tmp_tar:
        with open(tmp_tar, "wb") as handle, _tar_writer(handle) as sink:

            def on_success(i: int, result: SampleResult) -> None:
                _write_sample(sink, ext, keys[i], rows[i], captions[i], result)

            with Progress(shard_label("download", shard_uri), len(urls)) as progress:
                outcome = download_rows(urls, on_success, config, blocklist, progress, origin_store)
        tar_bytes = os.path.getsize(tmp_tar)
    out = _with_results(table if "key" in table.column_names else table.add_column(0, "key", pa.array(keys)),
                        _result_columns(captions, outcome.results))
    with storage.atomic_local_path(parquet_uri, suffix=".parquet") as tmp:
        pq.write_table(out, tmp, compression="zstd")
        checksum = storage.file_sha256(tmp)
    stats = _stats_for(outcome.results, outcome, parquet_uri)
    stats.bytes_written = tar_bytes
    stats.checksum = checksum
    elapsed = time.time() - started
    stats.extra["samples_per_s"] = round(len(urls) / elapsed, 2) if elapsed > 0 else None
    stats.extra["tar_uri"] = tar_uri
    return stats.done()


def retry_failed(
    shard_uri: str,
    tar_uri: str,
    parquet_uri: str,
    config: DownloadConfig,
    blocklist: Blocklist | None = None,
    origin_store: SharedOriginStore | None = None,
) -> ShardStats:
    """Re-download only the retryable failures of a finished shard and merge them in.

    Retryable: timeouts, connection errors, 429, 5xx and an unreachable robots.txt.
    Writes a new tar (old members + new successes) and a new Parquet (same rows, same
    order, retried rows updated), each atomically; the Parquet last.
    """
    if not storage.exists(parquet_uri):
        return download_shard(shard_uri, tar_uri, parquet_uri, config, blocklist, origin_store)
    table = read_parquet(parquet_uri, "download results")
    for name in ("key", "url", "status"):
        if name not in table.column_names:
            raise StageError(f"download results {parquet_uri}: no '{name}' column")
    statuses = table.column("status").to_pylist()
    todo = [i for i, s in enumerate(statuses) if is_retryable(s)]
    keys = [str(k) for k in table.column("key").to_pylist()]
    captions = _captions(table, parquet_uri)
    urls = table.column("url").to_pylist()
    rows = table.select([c for c in ("uid", "url", "page_url", "record_date") if c in table.column_names]).to_pylist()
    old_results = _results_from_table(table)
    ext = config.encode_format
    with storage.local_copy(tar_uri) as old_tar, storage.atomic_local_path(tar_uri, suffix=".tar") as tmp_tar:
        with open(tmp_tar, "wb") as handle, _tar_writer(handle) as sink:
            retried_keys = {keys[i] for i in todo}
            with tarfile.open(old_tar) as old:
                for member in old:  # copy the old samples byte for byte, skipping any retried key
                    if member.name.split(".", 1)[0] in retried_keys:
                        continue
                    extracted = old.extractfile(member)
                    sink.tarstream.addfile(member, extracted)

            def on_success(j: int, result: SampleResult) -> None:
                i = todo[j]
                _write_sample(sink, ext, keys[i], rows[i], captions[i], result)

            with Progress(shard_label("download retry", shard_uri), len(todo)) as progress:
                outcome = download_rows([urls[i] for i in todo], on_success, config, blocklist, progress, origin_store)
        tar_bytes = os.path.getsize(tmp_tar)
    merged = list(old_results)
    for j, i in enumerate(todo):
        merged[i] = outcome.results[j]
    out = _with_results(table, _result_columns(captions, merged))
    with storage.atomic_local_path(parquet_uri, suffix=".parquet") as tmp:
        pq.write_table(out, tmp, compression="zstd")
        checksum = storage.file_sha256(tmp)
    stats = _stats_for(merged, outcome, parquet_uri)
    stats.bytes_written = tar_bytes
    stats.checksum = checksum
    stats.extra.update({"retried": len(todo), "recovered": sum(r.status == SUCCESS for r in outcome.results)})
    stats.extra["tar_uri"] = tar_uri
    return stats.done()


def has_retryable(parquet_uri: str) -> bool:
    """Whether a finished shard has failures worth retrying (reads the status column only)."""
    if not storage.exists(parquet_uri):
        return True
    statuses = read_parquet(parquet_uri, "download results", columns=["status"]).column("status").to_pylist()
    return any(is_retryable(s) for s in statuses)


def _results_from_table(table: pa.Table) -> list[SampleResult]:
    """Rebuild per-row results from a results Parquet (for merging a retry)."""
    missing = [None] * table.num_rows
    cols = {name: table.column(name).to_pylist() if name in table.column_names else missing for name in RESULT_SCHEMA.names}
    out: list[SampleResult] = []
    for i in range(table.num_rows):
        get = lambda name: cols[name][i]  # noqa: E731
        image = None
        if get("sha256") is not None or get("original_width") is not None or get("width") is not None:
            image = ImageResult(
                status=get("status"),
                width=get("width"),
                height=get("height"),
                original_width=get("original_width"),
                original_height=get("original_height"),
                original_bytes=get("original_bytes") or 0,
                mime_type=get("mime_type"),
                sha256=get("sha256"),
            )
        out.append(SampleResult(get("status"), get("error_message"), get("final_url"), image, UsagePref.from_row(get("usage_pref"))))
    return out
