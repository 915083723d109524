"""Tag stage over a synthetic shard: one row per input row, statuses, scores, hash-list blocking."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from laion_tasks.config import ClipConfig, HashListsConfig, TagConfig
from laion_tasks.hashlists import HashLists, pdq_hash
from laion_tasks.stage import StageError
from laion_tasks.stages.tag import OUTPUT_SCHEMA, keyword_pattern, tag_shard
from tests.tag_fixtures import TINY_CLIP, jpeg_bytes, make_image, make_shard

CLIP = ClipConfig.model_validate(TINY_CLIP)


def run(shard, hashlists: dict | None = None, **tag_kwargs):
    lists = HashLists.from_config(HashListsConfig(**hashlists)) if hashlists else None
    stats = tag_shard(shard.images_parquet, shard.tar, shard.clip_parquet, shard.img_emb, shard.out,
                      TagConfig(**tag_kwargs), CLIP, lists)
    return stats, pq.read_table(shard.out).to_pylist()


def tar_keys(path: str) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.partition(".")[0] for m in tar}


def every_output_byte(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_zero_shot_tagging_keeps_every_row_in_order(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="laion_tasks.progress")
    shard = make_shard(tmp_path, n=8, failed=(4,), no_embedding=(6,))
    stats, rows = run(shard)
    assert any(re.match(r"tag \S+: 7/7 images \(100\.0%\), .* finished in", m) for m in caplog.messages)
    assert pq.read_schema(shard.out).names == OUTPUT_SCHEMA.names
    assert [r["key"] for r in rows] == shard.keys
    status = [r["tag_status"] for r in rows]
    assert status == ["tagged"] * 4 + ["no_image", "tagged", "no_embedding", "tagged"]
    assert stats.counts == {"success": 6, "skip:no_image": 1, "fail:no_embedding": 1}
    for r in rows:
        if r["tag_status"] == "tagged":
            assert 0.0 <= r["punsafe"] <= 1.0 and r["nsfw_method"] == "zero_shot"
            assert 0.0 <= r["pwatermark"] <= 1.0 and r["watermark_method"] == "zero_shot"
            assert len(r["pdq"]) == 64
        else:
            assert r["punsafe"] is None and r["pwatermark"] is None
        assert r["aesthetic_score"] is None  # no weights: null, never faked
        assert r["nudenet_unsafe"] is None
        assert r["hashlist_blocked"] is False
    assert stats.extra["aesthetic_available"] is False
    # language from the alt text
    assert rows[0]["language"] == "en" and rows[0]["language_group"] == "en"
    assert rows[1]["language"] == "de" and rows[1]["language_group"] == "multi"
    assert rows[4]["language_group"] == "nolang"  # "xx"
    # alt-text keywords: "naked" hits, "Essex" does not hit "sex"
    assert [r["nsfw_text"] for r in rows] == [False, False, False, True, False, False, False, False]


def test_compacted_embeddings_are_mapped_to_their_rows(tmp_path):
    a = make_shard(tmp_path / "a", n=6, failed=(1,), seed=3)
    b = make_shard(tmp_path / "b", n=6, failed=(1,), seed=3, compact_embeddings=True)
    _, rows_a = run(a)
    _, rows_b = run(b)
    assert [r["punsafe"] for r in rows_a] == pytest.approx([r["punsafe"] for r in rows_b], nan_ok=True, abs=1e-6)


def test_keyword_pattern_is_whole_word_and_case_insensitive():
    pattern = keyword_pattern(["sex", "xxx"])
    assert pattern.search("SEX toys") and pattern.search("buy xxx now")
    assert not pattern.search("Essex") and not pattern.search("sextant")


def test_hash_listed_images_are_never_written(tmp_path):
    listed_pdq_source = make_image(900, size=96)
    shard = make_shard(tmp_path / "shard", n=8, failed=(4,), images={3: listed_pdq_source})
    by_sha = shard.keys[1]
    by_url = shard.keys[2]
    by_pdq = shard.keys[3]
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "img.txt").write_text(f"sha1:{hashlib.sha1(shard.image_bytes[by_sha]).hexdigest()}\n")
    (lists / "url.txt").write_text(f"# generated\n{hashlib.md5(shard.urls[2].encode()).hexdigest()}\n")
    # the PDQ list holds the hash of a re-encoded, resized copy: a perceptual match, not a byte match
    variant = io.BytesIO(jpeg_bytes(listed_pdq_source.resize((80, 80)), quality=50))
    from PIL import Image

    (lists / "pdq.txt").write_text(pdq_hash(Image.open(variant))[0].hex() + "\n")
    blocked_bytes = [shard.image_bytes[k] for k in (by_sha, by_url, by_pdq)]

    stats, rows = run(shard, hashlists={"image": str(lists / "img.txt"), "url": str(lists / "url.txt"),
                                        "pdq": str(lists / "pdq.txt")})
    status = {r["key"]: r["tag_status"] for r in rows}
    assert {k for k, s in status.items() if s == "blocked_hashlist"} == {by_sha, by_url, by_pdq}
    assert all(r["hashlist_blocked"] == (r["key"] in {by_sha, by_url, by_pdq}) for r in rows)
    blocked_rows = [r for r in rows if r["hashlist_blocked"]]
    assert all(r["punsafe"] is None and r["pwatermark"] is None for r in blocked_rows)
    assert stats.counts["drop:blocked_hashlist"] == 3
    assert stats.extra["hashlist_matches"] == {"url": 1, "image": 1, "pdq": 1}
    # the tar no longer holds any file of a blocked sample, and no output anywhere holds the bytes
    assert tar_keys(shard.tar) == set(shard.image_bytes) - {by_sha, by_url, by_pdq}
    everything = every_output_byte(tmp_path / "shard")
    assert not any(b in everything for b in blocked_bytes)
    assert shard.urls[2].encode() not in open(shard.tar, "rb").read()
    # the remaining samples are intact
    with tarfile.open(shard.tar) as tar:
        kept = {m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    assert kept == {f"{k}.jpg": v for k, v in shard.image_bytes.items() if k not in {by_sha, by_url, by_pdq}}

    # re-run with no lists at all: the blocks are sticky (bytes are gone, status stays)
    stats2, rows2 = run(shard)
    assert {r["key"] for r in rows2 if r["tag_status"] == "blocked_hashlist"} == {by_sha, by_url, by_pdq}
    assert stats2.counts["drop:blocked_hashlist"] == 3


def test_samples_blocked_by_the_download_stage_stay_blocked(tmp_path):
    shard = make_shard(tmp_path, n=4, failed=(2,))
    import pyarrow as pa

    table = pq.read_table(shard.images_parquet)
    status = table.column("status").to_pylist()
    status[2] = "blocked_hashlist"
    pq.write_table(table.set_column(table.schema.get_field_index("status"), "status", pa.array(status)),
                   shard.images_parquet)
    _, rows = run(shard)
    assert rows[2]["tag_status"] == "blocked_hashlist" and rows[2]["hashlist_blocked"]


def test_missing_and_corrupt_images_get_a_status(tmp_path):
    shard = make_shard(tmp_path, n=4, failed=())
    with tarfile.open(shard.tar) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard.tar, "w") as tar:
        for m, data in members:
            if m.name.startswith(shard.keys[0]):
                continue  # sample 0 lost from the tar
            if m.name == f"{shard.keys[1]}.jpg":
                data = b"not a jpeg"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    stats, rows = run(shard)
    assert [r["tag_status"] for r in rows] == ["missing_from_tar", "image_unreadable", "tagged", "tagged"]
    assert stats.counts == {"fail:missing_from_tar": 1, "fail:image_unreadable": 1, "success": 2}


def test_misaligned_embeddings_raise_naming_the_file(tmp_path):
    shard = make_shard(tmp_path, n=4)
    np.save(shard.img_emb, np.zeros((2, 64), dtype=np.float16))
    with pytest.raises(StageError, match=r"img\.npy: 2 embedding rows"):
        run(shard)


def test_tag_on_s3(tmp_path, s3_root):
    from laion_tasks import storage

    shard = make_shard(tmp_path, n=4, failed=(3,))
    uris = {}
    for name in ("images_parquet", "tar", "clip_parquet", "img_emb"):
        path = getattr(shard, name)
        uris[name] = storage.join(s3_root, Path(path).name)
        storage.write_bytes(uris[name], Path(path).read_bytes())
    (tmp_path / "img.txt").write_text(hashlib.sha256(shard.image_bytes[shard.keys[0]]).hexdigest() + "\n")
    out = storage.join(s3_root, "tags", "000000.parquet")
    stats = tag_shard(uris["images_parquet"], uris["tar"], uris["clip_parquet"], uris["img_emb"], out,
                      TagConfig(), CLIP, HashLists.from_config(HashListsConfig(image=str(tmp_path / "img.txt"))))
    assert stats.counts == {"drop:blocked_hashlist": 1, "success": 2, "skip:no_image": 1}
    local_tar = tmp_path / "back.tar"
    local_tar.write_bytes(storage.read_bytes(uris["tar"]))
    assert tar_keys(str(local_tar)) == {shard.keys[1], shard.keys[2]}


def test_cli_tag_dedup_and_langid(tmp_path, monkeypatch):
    import json
    import shutil

    from typer.testing import CliRunner

    from laion_tasks import layout
    from laion_tasks.cli import app

    root, snap = tmp_path / "data", "CC-MAIN-2024-10"
    shard = make_shard(tmp_path / "build", n=4, failed=(1,))
    targets = {
        shard.images_parquet: layout.images_parquet_uri(str(root), snap, "000000"),
        shard.tar: layout.images_tar_uri(str(root), snap, "000000"),
        shard.clip_parquet: layout.clip_parquet_uri(str(root), snap, "000000"),
        shard.img_emb: layout.clip_image_emb_uri(str(root), snap, "000000"),
    }
    for src, dst in targets.items():
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    plan = Path(layout.shards_manifest_uri(str(root), snap))  # the download plan: dedup's shards are its shards
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_text(json.dumps({"shard_size": 4, "candidates": {}, "shards": {"000000": "fixture"}}))
    for name, value in {"STORAGE__ROOT": str(root), "LINEAGE__URL": f"sqlite:///{tmp_path / 'lineage.db'}", "CLIP__ENGLISH__MODEL": "laion-tiny-clip",
                        "CLIP__ENGLISH__PRETRAINED": "", "CLIP__DEVICE": "cpu", "DEDUP__BUCKETS": "4"}.items():
        monkeypatch.setenv(f"LAION_{name}", value)
    runner = CliRunner()
    result = runner.invoke(app, ["tag", "--snapshot", snap, "--shard", "000000"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"] == {"success": 3, "skip:no_image": 1}
    assert pq.read_table(layout.tags_parquet_uri(str(root), snap, "000000")).num_rows == 4
    result = runner.invoke(app, ["dedup", "--snapshot", snap])
    assert result.exit_code == 0, result.output
    assert pq.read_table(Path(layout.dedup_dir(str(root), snap)) / "000000.parquet").num_rows == 4
    # the runner's steps, recorded as `laion run` records them; a second dedup finds them current
    report = json.loads(result.output)
    assert set(report) == {"dedup_centroids", "dedup_partition", "dedup_bucket", "dedup"}
    assert (report["dedup_partition"]["done"], report["dedup_bucket"]["done"], report["dedup"]["done"]) == (1, 4, 1)
    from laion_tasks.lineage import Lineage

    recorded = Lineage(f"sqlite:///{tmp_path / 'lineage.db'}").runs(snap)
    assert {r["stage"] for r in recorded} >= {"tag", "dedup_partition", "dedup_bucket", "dedup"}
    assert all(r["status"] == "done" for r in recorded)
    again = json.loads(runner.invoke(app, ["dedup", "--snapshot", snap]).output)
    assert sum(step["done"] for step in again.values()) == 0 and again["dedup"]["skipped"] == 1
    result = runner.invoke(app, ["langid", "Der Hund schläft im Garten"])
    assert result.exit_code == 0 and json.loads(result.output)[0]["language"] == "de"


def test_language_comes_from_the_clip_parquet_not_a_second_detection(tmp_path):
    """Language ID runs once (clip stage); tag copies its columns by key, in the download order."""
    import pyarrow as pa

    shard = make_shard(tmp_path, n=6, failed=(2,))
    clip = pq.read_table(shard.clip_parquet)
    # Values no detector would give these captions, and the clip rows in reverse order.
    marked = clip.set_column(clip.schema.get_field_index("language"), "language",
                             pa.array([f"q{i}" for i in range(6)], pa.string()))
    pq.write_table(marked.take(pa.array(list(range(5, -1, -1)))), shard.clip_parquet)
    _, rows = run(shard)
    assert [r["language"] for r in rows] == [f"q{i}" for i in range(6)]
    assert [r["language_group"] for r in rows] == clip.column("language_group").to_pylist()

    pq.write_table(clip.drop_columns(["language_group"]), shard.clip_parquet)
    with pytest.raises(StageError, match="language_group"):
        run(shard)
    pq.write_table(clip.slice(0, 5), shard.clip_parquet)
    with pytest.raises(StageError, match="not scored"):
        run(shard)
