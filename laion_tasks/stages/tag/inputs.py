"""The tag stage's inputs: a download shard's rows and tar, its CLIP languages and embeddings, and the
tar rewrite that removes hash-list blocked images."""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from laion_tasks import storage
from laion_tasks.hashlists import HashLists
from laion_tasks.stage import StageError, read_parquet

log = logging.getLogger(__name__)

BLOCKED = "blocked_hashlist"

OUTPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uid", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float32()),
        ("language_group", pa.string()),
        ("punsafe", pa.float32()),
        ("nsfw_method", pa.string()),
        ("nsfw_text", pa.bool_()),
        ("nudenet_unsafe", pa.float32()),
        ("pwatermark", pa.float32()),
        ("watermark_method", pa.string()),
        ("aesthetic_score", pa.float32()),
        ("pdq", pa.string()),
        ("hashlist_blocked", pa.bool_()),
        ("tag_status", pa.string()),
    ]
)




def _embedding_rows(clip_table: pa.Table, emb: np.ndarray, emb_uri: str) -> np.ndarray:
    """Row of ``emb`` for each clip row (-1: none). Accepts aligned or compacted (has_embedding only) arrays."""
    n = clip_table.num_rows
    has = (
        np.asarray(clip_table.column("has_embedding").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
        if "has_embedding" in clip_table.column_names
        else np.ones(n, dtype=bool)
    )
    if emb.shape[0] == n:
        return np.where(has, np.arange(n), -1)
    if emb.shape[0] == int(has.sum()):
        return np.where(has, np.cumsum(has) - 1, -1)
    raise StageError(
        f"{emb_uri}: {emb.shape[0]} embedding rows match neither the {n} clip rows nor their {int(has.sum())} embeddings"
    )


def _rewrite_tar_without(src: Path, tar_uri: str, blocked: set[str]) -> int:
    """Copy the tar member by member, leaving out every file of a blocked key. Returns members removed."""
    removed = 0
    with storage.atomic_local_path(tar_uri, suffix=".tar") as tmp:
        with tarfile.open(src, "r:*") as old, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as new:
            for member in old:
                key = member.name.rsplit("/", 1)[-1].partition(".")[0]
                if key in blocked:
                    removed += 1
                    continue
                new.addfile(member, old.extractfile(member) if member.isfile() else None)
    return removed


def _previously_blocked(out_parquet_uri: str) -> set[str]:
    try:
        if not storage.exists(out_parquet_uri):
            return set()
    except storage.StorageError:
        return set()
    table = read_parquet(out_parquet_uri, "previous tag output")
    if "tag_status" not in table.column_names:
        return set()
    keys = table.column("key").to_pylist()
    return {k for k, s in zip(keys, table.column("tag_status").to_pylist()) if s == BLOCKED}




@dataclass
class _DownloadRows:
    """The download parquet's columns that tagging reads, one entry per row, in its order."""

    keys: list[str]
    uids: list[Any]
    statuses: list[Any]
    urls: list[Any]
    captions: list[Any]
    sha256s: list[Any]
    row_of: dict[str, int]

    @property
    def n(self) -> int:
        return len(self.keys)


@dataclass
class _Columns:
    n: int
    punsafe: np.ndarray = field(init=False)
    pwatermark: np.ndarray = field(init=False)
    aesthetic: np.ndarray = field(init=False)
    nudenet: np.ndarray = field(init=False)
    nsfw_method: list[str | None] = field(init=False)
    watermark_method: list[str | None] = field(init=False)
    pdq: list[str | None] = field(init=False)
    blocked: np.ndarray = field(init=False)
    status: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.punsafe = np.full(self.n, np.nan, dtype=np.float32)
        self.pwatermark = np.full(self.n, np.nan, dtype=np.float32)
        self.aesthetic = np.full(self.n, np.nan, dtype=np.float32)
        self.nudenet = np.full(self.n, np.nan, dtype=np.float32)
        self.nsfw_method = [None] * self.n
        self.watermark_method = [None] * self.n
        self.pdq = [None] * self.n
        self.blocked = np.zeros(self.n, dtype=bool)
        self.status = ["no_image"] * self.n

    def block(self, i: int) -> None:
        self.blocked[i] = True
        self.status[i] = BLOCKED


def _float_column(values: np.ndarray) -> pa.Array:
    return pa.array(values, type=pa.float32(), mask=np.isnan(values))


def _read_download_rows(images_parquet_uri: str) -> _DownloadRows:
    images = read_parquet(images_parquet_uri, "download parquet")
    for col in ("key", "uid", "status"):
        if col not in images.column_names:
            raise StageError(f"{images_parquet_uri}: missing column {col!r}")
    n = images.num_rows
    keys: list[str] = [str(k) for k in images.column("key").to_pylist()]

    def optional(name: str) -> list[Any]:
        return images.column(name).to_pylist() if name in images.column_names else [None] * n

    rows = _DownloadRows(
        keys=keys,
        uids=images.column("uid").to_pylist(),
        statuses=images.column("status").to_pylist(),
        urls=optional("url"),
        captions=optional("caption"),
        sha256s=optional("sha256"),
        row_of={k: i for i, k in enumerate(keys)},
    )
    if len(rows.row_of) != n:
        raise StageError(f"{images_parquet_uri}: duplicate keys in the download parquet")
    return rows


def _block_without_image(
    rows: _DownloadRows, cols: _Columns, hashlists: HashLists | None, sticky: set[str]
) -> None:
    """Hash-list checks that need no image: previous blocks, download's own blocks, URL, original sha256."""
    for i in range(rows.n):
        if rows.keys[i] in sticky or rows.statuses[i] == BLOCKED:
            cols.block(i)
        elif hashlists is not None and (
            (rows.urls[i] and hashlists.url_blocked(rows.urls[i])) or hashlists.digest_blocked("sha256", rows.sha256s[i])
        ):
            cols.block(i)


_LANGUAGE_COLUMNS = ("language", "language_score", "language_group")


def _clip_languages(rows: _DownloadRows, clip_table: pa.Table, clip_parquet_uri: str) -> dict[str, pa.Array]:
    """The clip stage's language columns aligned to the download rows: language ID runs once, in the clip stage."""
    missing = [c for c in ("key", *_LANGUAGE_COLUMNS) if c not in clip_table.column_names]
    if missing:
        raise StageError(f"{clip_parquet_uri}: missing column(s) {missing}; re-run the clip stage")
    position = {str(k): j for j, k in enumerate(clip_table.column("key").to_pylist())}
    absent = [k for k in rows.keys if k not in position]
    if absent:
        raise StageError(f"{clip_parquet_uri}: {len(absent)} download row(s) not scored, e.g. {absent[0]!r}; "
                         "re-run the clip stage")
    take = pa.array([position[k] for k in rows.keys], pa.int64())
    return {c: clip_table.column(c).take(take).combine_chunks().cast(OUTPUT_SCHEMA.field(c).type)
            for c in _LANGUAGE_COLUMNS}


def _load_embeddings(rows: _DownloadRows, clip_table: pa.Table, img_emb_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image embeddings aligned to the download rows (zeros where none), and which rows have one."""
    n = rows.n
    with storage.local_copy(img_emb_uri) as emb_path:
        try:
            emb_all = np.load(emb_path, mmap_mode="r")
        except Exception as exc:
            raise StageError(f"{img_emb_uri}: cannot load embeddings: {type(exc).__name__}: {exc}") from exc
        emb_rows_clip = _embedding_rows(clip_table, emb_all, img_emb_uri)
        emb_row = np.full(n, -1, dtype=np.int64)
        clip_keys = [str(k) for k in clip_table.column("key").to_pylist()]
        for j, k in enumerate(clip_keys):
            i = rows.row_of.get(k)
            if i is not None:
                emb_row[i] = emb_rows_clip[j]
        has_emb = emb_row >= 0
        emb = np.zeros((n, emb_all.shape[1] if emb_all.ndim == 2 else 0), dtype=np.float32)
        if has_emb.any():
            emb[has_emb] = np.asarray(emb_all[emb_row[has_emb]], dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12), has_emb


