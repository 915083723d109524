"""Curate's writers: rolling Parquet parts and WebDataset tars of a subset, each committed atomically."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import layout, storage
from laion_tasks.config import CurateConfig
from laion_tasks.snapshot_db import (  # noqa: F401 - eligibility is defined with the samples view
    BASE_OUTCOMES,
    ELIGIBLE,
    base_checks,
    base_outcome_sql,
    eligible_sql,
)
from laion_tasks.snapshot_db import SnapshotDB
from laion_tasks.stage import StageError
from laion_tasks.wds import iter_samples
from laion_tasks.stages.curate.columns import (
    LAION_COLUMNS,
    PART_RE,
    TAR_RE,
    WDS_DIR,
)
from laion_tasks.stages.curate.scan import SCAN_TABLE

log = logging.getLogger(__name__)


class _RollingParquetWriter:
    """``part-NNNNN.parquet`` files of at most ``rows_per_file`` rows, each committed atomically."""

    def __init__(self, out_dir: str, schema: pa.Schema, rows_per_file: int) -> None:
        self.out_dir, self.schema, self.rows_per_file = out_dir, schema, max(1, rows_per_file)
        self.parts: list[dict[str, Any]] = []
        self._ctx: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._rows = 0

    def _open(self) -> None:
        name = f"part-{len(self.parts):05d}.parquet"
        self._ctx = storage.atomic_local_path(storage.join(self.out_dir, name), suffix=".parquet")
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._rows = 0
        self.parts.append({"name": name, "rows": 0, "bytes": 0})

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None or self._rows >= self.rows_per_file:
                self.close_current()
                self._open()
            assert self._writer is not None
            room = self.rows_per_file - self._rows
            chunk, table = table.slice(0, room), table.slice(room)
            self._writer.write_table(chunk)
            self._rows += chunk.num_rows
            self.parts[-1]["rows"] = self._rows

    def close_current(self, exc: BaseException | None = None) -> None:
        if self._writer is None:
            return
        self._writer.close()
        assert self._tmp is not None
        if exc is None:
            self.parts[-1]["bytes"] = self._tmp.stat().st_size
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
        self._writer = self._ctx = None

    def finish(self) -> list[dict[str, Any]]:
        if not self.parts:  # an empty subset still gets one empty part with the schema
            self._open()
        self.close_current()
        return self.parts


def _write_parquet_parts(db: SnapshotDB, out_dirs: dict[str, str], flags: dict[str, str], config: CurateConfig) -> dict[str, list[dict[str, Any]]]:
    """One ordered read of the scan table, each batch routed to every subset it belongs to."""
    cols = ", ".join(f'"{c}"' for c in LAION_COLUMNS)
    chosen = list(out_dirs)
    reader = db.con.sql(
        f"SELECT {cols}, {', '.join(flags[n] for n in chosen)} FROM {SCAN_TABLE} WHERE keep ORDER BY _shard, key"
    ).to_arrow_reader(65_536)
    schema = pa.schema([reader.schema.field(c) for c in LAION_COLUMNS])
    writers = {n: _RollingParquetWriter(out_dirs[n], schema, config.rows_per_file) for n in chosen}
    try:
        for batch in reader:
            table = pa.Table.from_batches([batch])
            data = table.select(LAION_COLUMNS)
            for name in chosen:
                writers[name].write(data.filter(table.column(flags[name])))
        return {n: w.finish() for n, w in writers.items()}
    except BaseException as exc:
        for w in writers.values():
            w.close_current(exc)
        raise


class _RollingTarWriter:
    """Writes samples into ``NNNNN.tar`` files of at most ``per_tar`` samples, each committed atomically."""

    def __init__(self, out_dir: str, per_tar: int) -> None:
        self.out_dir = out_dir
        self.per_tar = max(1, per_tar)
        self.sizes: dict[str, int] = {}
        self.bytes_written = 0
        self._ctx: Any = None
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._name = ""
        self._count = 0

    def _open(self) -> None:
        self._name = f"{len(self.sizes):05d}.tar"
        self._ctx = storage.atomic_local_path(storage.join(self.out_dir, self._name), suffix=".tar")
        self._tmp = self._ctx.__enter__()
        self._tar = tarfile.open(self._tmp, "w")
        self._count = 0
        self.sizes[self._name] = 0

    def add_sample(self, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
        if self._tar is None or self._count >= self.per_tar:
            self.close_current()
            self._open()
        assert self._tar is not None
        for info, data in members:
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.sizes[self._name] = self._count

    def close_current(self, exc: BaseException | None = None) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp is not None
        self.bytes_written += self._tmp.stat().st_size if exc is None else 0
        ctx, self._ctx, self._tar = self._ctx, None, None
        if exc is None:
            ctx.__exit__(None, None, None)
        else:
            ctx.__exit__(type(exc), exc, exc.__traceback__)


def _iter_subset_keys_by_shard(db: SnapshotDB, flag: str) -> Iterator[tuple[str, set[str]]]:
    """(shard, keys) of one subset from the scan table, a batch at a time."""
    reader = db.con.sql(f"SELECT _shard, key FROM {SCAN_TABLE} WHERE keep AND {flag} ORDER BY _shard, key").to_arrow_reader(65_536)
    shard: str | None = None
    keys: set[str] = set()
    for batch in reader:
        shards = batch.column(0).to_numpy(zero_copy_only=False)
        cuts = [0, *(int(i) + 1 for i in (shards[1:] != shards[:-1]).nonzero()[0]), len(shards)]
        names = batch.column(1).to_pylist()
        for a, b in zip(cuts[:-1], cuts[1:]):
            if a == b:
                continue
            if shards[a] != shard:
                if shard is not None:
                    yield shard, keys
                shard, keys = str(shards[a]), set()
            keys.update(names[a:b])
    if shard is not None:
        yield shard, keys


def _write_webdataset(db: SnapshotDB, out_dir: str, flag: str, config: CurateConfig) -> dict[str, Any]:
    """Copy the subset's samples (all their files: jpg, txt, json) out of the download tars."""
    wds_dir = storage.join(out_dir, WDS_DIR)
    writer = _RollingTarWriter(wds_dir, config.samples_per_tar)
    missing = 0
    try:
        for shard, keys in _iter_subset_keys_by_shard(db, flag):
            tar_uri = layout.images_tar_uri(db.root, db.snapshot, shard)
            found: set[str] = set()
            try:
                with storage.open_read(tar_uri) as handle:
                    for key, members in iter_samples(handle, keys):
                        if key in found:
                            continue
                        found.add(key)
                        writer.add_sample(members)
            except (storage.StorageError, tarfile.TarError) as exc:
                raise StageError(f"reading images tar {tar_uri} for shard {shard}: {exc}") from exc
            if len(found) < len(keys):
                missing += len(keys) - len(found)
                log.warning("%s: %d subset samples have no image in the tar", tar_uri, len(keys) - len(found))
        writer.close_current()
    except BaseException as exc:
        writer.close_current(exc)
        raise
    sizes = writer.sizes
    storage.write_bytes(storage.join(wds_dir, "sizes.json"), json.dumps(sizes, indent=1, sort_keys=True).encode())
    names = sorted(sizes)
    train_data = f"{{{names[0][:-4]}..{names[-1][:-4]}}}.tar" if names else ""
    return {
        "dir": WDS_DIR,
        "shards": [{"name": n, "samples": sizes[n]} for n in names],
        "samples": sum(sizes.values()),
        "missing_images": missing,
        "train_data": f"{WDS_DIR}/{train_data}" if names else "",
        "bytes": writer.bytes_written,
    }


def _remove_stale(out_dir: str, keep: set[str]) -> None:
    """Delete data files of an earlier run that this run did not write (fewer parts now)."""
    prefix = out_dir.rstrip("/")
    for uri in storage.list_uris(out_dir):
        rel = uri[len(prefix) + 1 :].replace("\\", "/")
        name = rel.rsplit("/", 1)[-1]
        is_part = "/" not in rel and PART_RE.match(name)
        is_tar = rel.startswith(f"{WDS_DIR}/") and (TAR_RE.match(name) or name == "sizes.json")
        if (is_part or is_tar) and rel not in keep:
            storage.delete(uri)
