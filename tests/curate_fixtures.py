"""A small generated snapshot with every upstream output curation reads.

Written through laion_tasks.storage, so the same generator fills a local root and an
s3:// (moto) root. Rows are drawn from a seeded RNG with every case the curation rules
distinguish: failed downloads, unscored and CLIP-filtered pairs, three language groups,
hash-list hits, duplicates, small and large originals. ``make_snapshot`` returns the
merged rows so tests compute the expected outcomes in plain Python.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from laion_tasks import layout, storage

FAIL_CODES = ["fail:http_404", "fail:timeout", "fail:decode_error"]
LANGS = [("en", "en")] * 5 + [("de", "multi"), ("fr", "multi"), ("ja", "multi")] + [(None, "nolang")] * 2


def _write_parquet(uri: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    with storage.atomic_local_path(uri, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


IMAGES_SCHEMA = pa.schema(
    [
        ("key", pa.string()), ("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
        ("page_url", pa.string()), ("wat_file", pa.string()), ("status", pa.string()),
        ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("original_width", pa.int32()), ("original_height", pa.int32()), ("original_bytes", pa.int64()),
        ("mime_type", pa.string()), ("sha256", pa.string()), ("final_url", pa.string()),
    ]
)  # fmt: skip
CLIP_SCHEMA = pa.schema(
    [
        ("key", pa.string()), ("uid", pa.string()), ("similarity", pa.float32()), ("clip_status", pa.string()),
        ("clip_model", pa.string()), ("language", pa.string()), ("language_score", pa.float32()),
        ("language_group", pa.string()), ("has_embedding", pa.bool_()),
    ]
)  # fmt: skip
TAGS_SCHEMA = pa.schema(
    [
        ("key", pa.string()), ("uid", pa.string()), ("language", pa.string()), ("language_score", pa.float32()),
        ("language_group", pa.string()), ("punsafe", pa.float32()), ("pwatermark", pa.float32()),
        ("aesthetic_score", pa.float32()), ("nsfw_text", pa.bool_()), ("hashlist_blocked", pa.bool_()),
        ("tag_status", pa.string()),
    ]
)  # fmt: skip
DEDUP_SCHEMA = pa.schema(
    [
        ("uid", pa.string()), ("key", pa.string()), ("shard", pa.string()), ("dup_of", pa.string()),
        ("dup_of_key", pa.string()), ("dup_of_shard", pa.string()), ("dup_reason", pa.string()),
    ]
)  # fmt: skip


def f32(value: float | None) -> float | None:
    """The value as the float32 Parquet column will hold it, so Python and SQL compare alike."""
    return None if value is None else struct.unpack("f", struct.pack("f", value))[0]


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def make_snapshot(
    root: str,
    snapshot: str,
    *,
    shards: int = 3,
    per_shard: int = 60,
    seed: int = 0,
    with_aesthetic: bool = False,
    with_dedup: bool = True,
    dedup_by_uid_only: bool = False,
) -> list[dict[str, Any]]:
    """Write images/, clip/, tags/ (and dedup/) for a snapshot; return the merged rows."""
    rng = random.Random(seed)
    merged: list[dict[str, Any]] = []
    for s in range(shards):
        shard = layout.shard_name(s)
        images, clips, tags = [], [], []
        tar_buf = io.BytesIO()
        with tarfile.open(fileobj=tar_buf, mode="w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                url = f"http://img{i % 7}.example.com/{shard}/{i}.jpg"
                caption = rng.choice(["", "a cat", "a photo of a red bicycle", "Une maison près de la mer"])
                caption = f"{caption} {i}".strip() if caption else ""
                if merged and rng.random() < 0.08:
                    # The same (url, alt) again elsewhere: same uid, an exact duplicate.
                    src = rng.choice(merged)
                    url, caption = src["url"], src["caption"]
                uid = hashlib.sha1(f"{url}\n{caption}".encode()).hexdigest()[:16]
                ok = rng.random() < 0.8
                status = "success" if ok else rng.choice(FAIL_CODES)
                ow, oh = (rng.choice([300, 640, 1024, 1600, 2400]), rng.choice([200, 480, 1024, 1200])) if ok else (None, None)
                obytes = rng.choice([3000, 4999, 5000, 80_000, 400_000]) if ok else None
                image = _jpeg((rng.randrange(256), rng.randrange(256), rng.randrange(256))) if ok else None
                lang, group = rng.choice(LANGS)
                if not ok:
                    similarity, clip_status = None, "no_image"
                elif not caption:
                    similarity, clip_status = None, "empty_caption"
                elif rng.random() < 0.05:
                    similarity, clip_status = None, "decode_error"
                else:
                    similarity = f32(round(rng.uniform(0.1, 0.45), 4))
                    threshold = 0.26 if group == "multi" else 0.28
                    clip_status = "kept" if similarity >= threshold else "filtered_clip_similarity"
                punsafe = f32(round(rng.random(), 3)) if ok else None
                row = {
                    "shard": shard, "key": key, "uid": uid, "url": url, "caption": caption,
                    "page_url": f"http://page.example.com/{s}/{i}", "wat_file": "fixture.warc.wat.gz",
                    "status": status, "error_message": None if ok else status,
                    "width": 24 if ok else None, "height": 24 if ok else None,
                    "original_width": ow, "original_height": oh, "original_bytes": obytes,
                    "mime_type": "image/jpeg" if ok else None,
                    "sha256": hashlib.sha256(image).hexdigest() if image else None,
                    "final_url": url if ok else None,
                    "similarity": similarity, "clip_status": clip_status, "clip_model": "laion-tiny-clip",
                    "language": lang, "language_score": 0.9 if lang else 0.2, "language_group": group,
                    "has_embedding": similarity is not None,
                    "punsafe": punsafe, "pwatermark": f32(round(rng.random(), 3)) if ok else None,
                    "aesthetic_score": f32(round(rng.uniform(3, 8), 2)) if (ok and with_aesthetic) else None,
                    "nsfw_text": False, "hashlist_blocked": ok and rng.random() < 0.05, "tag_status": "ok",
                }  # fmt: skip
                merged.append(row)
                images.append({k: row[k] for k in IMAGES_SCHEMA.names})
                clips.append({k: row[k] for k in CLIP_SCHEMA.names})
                tags.append({k: row[k] for k in TAGS_SCHEMA.names})
                if image is not None:
                    _add(tar, f"{key}.jpg", image)
                    _add(tar, f"{key}.txt", caption.encode())
                    _add(tar, f"{key}.json", json.dumps({"key": key, "url": url}).encode())
        storage.write_bytes(layout.images_tar_uri(root, snapshot, shard), tar_buf.getvalue())
        _write_parquet(layout.images_parquet_uri(root, snapshot, shard), images, IMAGES_SCHEMA)
        _write_parquet(layout.clip_parquet_uri(root, snapshot, shard), clips, CLIP_SCHEMA)
        _write_parquet(layout.tags_parquet_uri(root, snapshot, shard), tags, TAGS_SCHEMA)
    for row in merged:
        row.update(dup_of=None, dup_of_key=None, dup_of_shard=None, dup_reason=None)
    if not with_dedup:
        return merged
    # As the dedup stage decides: later copies of a (url, alt) point to the first ...
    first_of: dict[str, dict[str, Any]] = {}
    for row in merged:
        first = first_of.setdefault(row["uid"], row)
        if first is not row and not dedup_by_uid_only:
            row.update(dup_of=first["uid"], dup_of_key=first["key"], dup_of_shard=first["shard"], dup_reason="url_alt")
    # ... and some CLIP-kept samples are near-duplicates of an earlier kept sample.
    kept = [r for r in merged if r["clip_status"] == "kept" and r["dup_of"] is None]
    for prev, row in zip(kept, kept[1:]):
        if rng.random() < 0.15 and row["uid"] != prev["uid"]:
            row.update(dup_of=prev["uid"], dup_of_key=prev["key"], dup_of_shard=prev["shard"], dup_reason="near_embedding")
    if dedup_by_uid_only:
        # An older layout: one verdict per uid, no key. A uid with any representative row
        # keeps all its rows (curation cannot tell them apart).
        representative_uids = {r["uid"] for r in merged if r["dup_of"] is None}
        for r in merged:
            if r["uid"] in representative_uids:
                r.update(dup_of=None, dup_of_key=None, dup_of_shard=None, dup_reason=None)
        rows = [{"uid": r["uid"], "dup_of": r["dup_of"], "dup_reason": r["dup_reason"]} for r in merged]
        schema = pa.schema([("uid", pa.string()), ("dup_of", pa.string()), ("dup_reason", pa.string())])
        _write_parquet(storage.join(layout.dedup_dir(root, snapshot), "verdicts.parquet"), rows, schema)
        return merged
    for s in range(shards):
        shard = layout.shard_name(s)
        rows = [{k: r[k] for k in DEDUP_SCHEMA.names} for r in merged if r["shard"] == shard]
        _write_parquet(storage.join(layout.dedup_dir(root, snapshot), f"{shard}.parquet"), rows, DEDUP_SCHEMA)
    return merged


def expected_base_outcome(row: dict[str, Any], require_clip_kept: bool = True) -> str:
    """The curation rules of laion_tasks.stages.curate, restated in Python."""
    if row["status"] != "success":
        return "drop:not_downloaded"
    if row["similarity"] is None:
        return "drop:not_clip_scored"
    if require_clip_kept and row["clip_status"] != "kept":
        return "drop:clip_filtered"
    if row["hashlist_blocked"]:
        return "drop:hashlist_blocked"
    return "eligible"  # duplicates are decided within each subset (expected_outcomes in test_curate)


# The default subsets of laion_tasks.config, restated in Python.
EXPECTED_PREDICATES = {
    "laion2B-en": lambda r: r["language"] == "en" and r["similarity"] >= 0.28,
    "laion2B-multi": lambda r: r["language_group"] == "multi" and r["similarity"] >= 0.26,
    "laion1B-nolang": lambda r: r["language_group"] == "nolang" and r["similarity"] >= 0.28,
    "laion400m": lambda r: r["language"] == "en"
    and r["similarity"] >= 0.3
    and (r["punsafe"] or 0) <= 0.5
    and len(r["caption"]) >= 5
    and (r["original_bytes"] or 0) >= 5000,
    "laion-high-resolution": lambda r: r["original_width"] >= 1024 and r["original_height"] >= 1024,
    "research-safe": lambda r: r["punsafe"] is not None and r["punsafe"] <= 0.45,
}
