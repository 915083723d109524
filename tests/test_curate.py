"""Curation: predicates, LAION layout, accounting, unavailable subsets, WebDataset output, S3 roots."""

from __future__ import annotations

import io
import json
import math
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from laion_tasks import layout, storage
from laion_tasks.config import CurateConfig, SubsetConfig
from laion_tasks.snapshot_db import open_snapshot
from laion_tasks.stage import StageError
from laion_tasks.stages.curate import (
    LAION_COLUMNS,
    curate_snapshot,
    curate_subset,
    laion_hash,
    read_manifest,
    subset_counts,
)
from curate_fixtures import EXPECTED_PREDICATES, expected_base_outcome, make_snapshot

SNAP = "CC-TEST-2024-01"


def expected_outcomes(rows, predicate, require_clip_kept: bool = True) -> Counter:
    out: Counter = Counter()
    for r in rows:
        base = expected_base_outcome(r, require_clip_kept)
        if base != "eligible":
            out[base] += 1
        else:
            out["drop:predicate" if not predicate(r) else "drop:duplicate" if r["dup_of"] is not None else "kept"] += 1
    return out


def read_subset(root: str, name: str) -> tuple[list[dict], list[str]]:
    manifest = read_manifest(root, SNAP, name)
    assert manifest is not None and manifest["status"] == "ok"
    out_dir = layout.subset_dir(root, SNAP, name)
    rows: list[dict] = []
    names: list[str] = []
    for part in manifest["parquet"]:
        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out_dir, part["name"]))))
        names = table.schema.names
        assert table.num_rows == part["rows"]
        rows.extend(table.to_pylist())
    return rows, names


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory):
    root = str(tmp_path_factory.mktemp("curate-root"))
    rows = make_snapshot(root, SNAP, shards=3, per_shard=60)
    config = CurateConfig(rows_per_file=10, samples_per_tar=7)
    config.subsets["laion2B-en"].write_images = True
    results = curate_snapshot(root, SNAP, config)
    return root, rows, config, results


def test_every_subset_accounts_for_every_sample_once(curated) -> None:
    root, rows, _config, results = curated
    assert set(results) == set(CurateConfig().subsets)
    for name, predicate in EXPECTED_PREDICATES.items():
        stats = results[name]
        assert dict(stats.counts) == dict(expected_outcomes(rows, predicate)), name
        assert stats.total == len(rows)
        assert stats.extra["status"] == "ok"
        assert stats.extra["rows"] == stats.counts["kept"]
        manifest = read_manifest(root, SNAP, name)
        assert manifest["counts"] == dict(stats.counts)
        assert manifest["total_samples"] == len(rows)
    # The fixture exercises every drop reason, so each rule above was really tested.
    assert set(results["laion2B-en"].counts) == {
        "kept", "drop:predicate", "drop:not_downloaded", "drop:not_clip_scored",
        "drop:clip_filtered", "drop:hashlist_blocked", "drop:duplicate",
    }  # fmt: skip


def test_aesthetic_subset_is_unavailable_without_scores(curated) -> None:
    root, rows, _config, results = curated
    stats = results["laion-aesthetics-6.5"]
    assert stats.extra["status"] == "unavailable"
    assert "aesthetic_score" in stats.extra["reason"]
    eligible = sum(1 for r in rows if expected_base_outcome(r) == "eligible")
    assert stats.counts["drop:unavailable"] == eligible > 0
    assert "kept" not in stats.counts and stats.total == len(rows)
    manifest = read_manifest(root, SNAP, "laion-aesthetics-6.5")
    assert manifest["status"] == "unavailable" and manifest["parquet"] == []
    out_dir = Path(layout.subset_dir(root, SNAP, "laion-aesthetics-6.5"))
    assert not list(out_dir.glob("*.parquet"))


def test_laion_column_layout_and_values(curated) -> None:
    root, rows, config, results = curated
    by_key = {r["key"]: r for r in rows}
    out, names = read_subset(root, "laion2B-en")
    assert names == LAION_COLUMNS
    manifest = read_manifest(root, SNAP, "laion2B-en")
    assert [p["rows"] for p in manifest["parquet"]][:-1] == [config.rows_per_file] * (len(manifest["parquet"]) - 1)
    assert len(manifest["parquet"]) == math.ceil(len(out) / config.rows_per_file)
    expected_keys = sorted(
        r["key"] for r in rows
        if expected_base_outcome(r) == "eligible" and EXPECTED_PREDICATES["laion2B-en"](r) and r["dup_of"] is None
    )
    assert [r["key"] for r in out] == expected_keys  # ordered by (shard, key)
    for row in out:
        src = by_key[row["key"]]
        assert row["URL"] == src["url"] and row["TEXT"] == src["caption"]
        assert (row["WIDTH"], row["HEIGHT"]) == (src["original_width"], src["original_height"])
        assert row["LANGUAGE"] == "en" and row["status"] == "success"
        assert row["similarity"] == pytest.approx(src["similarity"])
        assert row["punsafe"] == pytest.approx(src["punsafe"])
        assert row["aesthetic"] is None
        assert row["hash"] == laion_hash(src["url"], src["caption"])
        assert row["sha256"] == src["sha256"] and row["uid"] == src["uid"]


def test_webdataset_subset_is_readable_by_webdataset_and_open_clip(curated) -> None:
    import webdataset as wds

    root, _rows, config, _results = curated
    manifest = read_manifest(root, SNAP, "laion2B-en")
    parquet_keys = [r["key"] for r in read_subset(root, "laion2B-en")[0]]
    info = manifest["webdataset"]
    assert info["samples"] == len(parquet_keys) and info["missing_images"] == 0
    wds_dir = Path(layout.subset_dir(root, SNAP, "laion2B-en")) / "webdataset"
    sizes = json.loads((wds_dir / "sizes.json").read_text())
    assert sum(sizes.values()) == len(parquet_keys)
    assert max(sizes.values()) <= config.samples_per_tar and len(sizes) == math.ceil(len(parquet_keys) / 7)
    urls = [str(wds_dir / name) for name in sorted(sizes)]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert [s["__key__"] for s in samples] == parquet_keys
    assert all(s["jpg"].size == (24, 24) and isinstance(s["txt"], str) for s in samples)

    # open_clip's own loader for `--dataset-type webdataset`, size taken from sizes.json. The eval
    # pipeline is used: open_clip_train 3.3's *train* pipeline trips on webdataset>=0.2.96's EOF
    # marker (webdataset issue #384), whatever the data.
    import open_clip
    import torchvision.transforms as T
    from open_clip_train.data import get_dataset_size, get_wds_dataset

    shards = str(Path(layout.subset_dir(root, SNAP, "laion2B-en")) / info["train_data"])
    assert get_dataset_size(shards) == (len(parquet_keys), len(sizes))
    args = SimpleNamespace(val_data=shards, val_num_samples=len(parquet_keys), workers=0, batch_size=4)
    data = get_wds_dataset(args, T.ToTensor(), is_train=False, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    batches = list(data.dataloader)
    assert sum(len(images) for images, _ in batches) == len(parquet_keys)
    images, texts = batches[0]
    assert tuple(images.shape) == (4, 3, 24, 24) and tuple(texts.shape) == (4, 77)


def test_exact_duplicates_sharing_a_uid_keep_their_representative(curated) -> None:
    """Dedup verdicts join on (shard, key): a uid shared by a representative and its copy keeps one row."""
    root, rows, _config, results = curated
    by_uid: dict[str, list[dict]] = {}
    for r in rows:
        by_uid.setdefault(r["uid"], []).append(r)
    shared = [group for group in by_uid.values() if len(group) > 1]
    high_res = EXPECTED_PREDICATES["laion-high-resolution"]
    kept_reps = [g[0] for g in shared if expected_base_outcome(g[0]) == "eligible" and high_res(g[0])]
    assert kept_reps, "the fixture must have eligible representatives whose uid is shared"
    out_keys = {r["key"] for r in read_subset(root, "laion-high-resolution")[0]}
    for rep in kept_reps:
        assert rep["key"] in out_keys
    for group in shared:
        assert not {r["key"] for r in group[1:]} & out_keys  # copies are duplicates


def test_dedup_verdicts_by_uid_only_are_still_understood(tmp_path: Path) -> None:
    root = str(tmp_path)
    rows = make_snapshot(root, SNAP, shards=2, per_shard=60, seed=1, dedup_by_uid_only=True)
    counts = subset_counts(root, SNAP, CurateConfig())
    expected = Counter(expected_base_outcome(r) for r in rows)
    assert {k: v for k, v in counts.base.items() if v} == dict(expected)
    assert counts.snapshot_duplicates > 0 and counts.duplicates["laion2B-en"] > 0


def test_aesthetic_subset_with_scores(tmp_path: Path) -> None:
    root = str(tmp_path)
    rows = make_snapshot(root, SNAP, shards=2, per_shard=50, seed=3, with_aesthetic=True)
    config = CurateConfig()
    stats = curate_subset(root, SNAP, "laion-aesthetics-6.5", config.subsets["laion-aesthetics-6.5"], config)

    def pred(r):
        return r["aesthetic_score"] >= 6.5 and r["punsafe"] < 0.5 and r["pwatermark"] < 0.8

    assert stats.extra["status"] == "ok"
    assert dict(stats.counts) == dict(expected_outcomes(rows, pred))
    assert stats.counts["kept"] > 0


def test_missing_tags_and_dedup(tmp_path: Path) -> None:
    """No tags yet: predicates on punsafe are unavailable; no dedup yet: nothing is a duplicate."""
    root = str(tmp_path)
    rows = make_snapshot(root, SNAP, shards=2, per_shard=40, seed=5, with_dedup=False)
    shutil.rmtree(tmp_path / SNAP / "tags")
    config = CurateConfig()
    counts = subset_counts(root, SNAP, config)
    assert counts.total == len(rows)
    assert counts.snapshot_duplicates == 0 and not any(counts.duplicates.values())
    assert counts.base["drop:hashlist_blocked"] == 0
    assert "research-safe" in counts.unavailable and "punsafe" in counts.unavailable["research-safe"]
    # language comes from the clip parquet when tags are missing
    assert "laion2B-en" not in counts.unavailable and counts.matched["laion2B-en"] > 0


def test_require_clip_kept_false_admits_every_scored_pair(tmp_path: Path) -> None:
    root = str(tmp_path)
    rows = make_snapshot(root, SNAP, shards=2, per_shard=50, seed=7)
    config = CurateConfig(require_clip_kept=False)
    name = "laion-high-resolution"
    stats = curate_subset(root, SNAP, name, config.subsets[name], config)
    expected = expected_outcomes(rows, EXPECTED_PREDICATES[name], require_clip_kept=False)
    assert dict(stats.counts) == dict(expected) and "drop:clip_filtered" not in stats.counts


def test_rerun_replaces_parts_and_removes_stale_ones(tmp_path: Path) -> None:
    root = str(tmp_path)
    make_snapshot(root, SNAP, shards=2, per_shard=50, seed=1)
    config = CurateConfig(rows_per_file=3)
    wide = SubsetConfig(where="similarity >= 0", write_images=True)
    first = curate_subset(root, SNAP, "s", wide, CurateConfig(rows_per_file=3, samples_per_tar=2))
    out_dir = Path(layout.subset_dir(root, SNAP, "s"))
    assert len(list(out_dir.glob("part-*.parquet"))) == math.ceil(first.counts["kept"] / 3) > 2
    narrow = SubsetConfig(where="similarity >= 0.4")
    second = curate_subset(root, SNAP, "s", narrow, config)
    manifest = read_manifest(root, SNAP, "s")
    assert sorted(p.name for p in out_dir.glob("part-*.parquet")) == [p["name"] for p in manifest["parquet"]]
    assert not (out_dir / "webdataset").exists() or not list((out_dir / "webdataset").iterdir())
    assert sum(p["rows"] for p in manifest["parquet"]) == second.counts["kept"] < first.counts["kept"]
    # Same inputs, same outputs: a re-run writes identical bytes.
    before = {p.name: p.read_bytes() for p in out_dir.glob("*.parquet")}
    again = curate_subset(root, SNAP, "s", narrow, config)
    assert again.checksum == second.checksum
    assert before == {p.name: p.read_bytes() for p in out_dir.glob("*.parquet")}


def test_empty_subset_still_writes_schema(tmp_path: Path) -> None:
    root = str(tmp_path)
    make_snapshot(root, SNAP, shards=1, per_shard=20)
    config = CurateConfig()
    stats = curate_subset(root, SNAP, "none", SubsetConfig(where="similarity > 5"), config)
    assert stats.extra["status"] == "ok" and stats.counts.get("kept", 0) == 0 and stats.total == 20
    rows, names = read_subset(root, "none")
    assert rows == [] and names == LAION_COLUMNS


@pytest.mark.parametrize(
    "where, message",
    [
        ("no_such_column > 1", "unknown column"),
        ("similarity > (SELECT 0.1)", "subqueries"),
        ("similarity > 0.1; DROP TABLE x", "does not parse"),
        ("similarity > 0); DROP TABLE x; SELECT (1", "does not parse"),
        ("similarity > 0); SELECT 1 WHERE (true", "single expression"),
        ("similarity >>>", "does not parse"),
    ],
)
def test_bad_predicates_name_the_subset(tmp_path: Path, where: str, message: str) -> None:
    root = str(tmp_path)
    make_snapshot(root, SNAP, shards=1, per_shard=10)
    with pytest.raises(StageError, match=message) as err:
        curate_subset(root, SNAP, "bad-one", SubsetConfig(where=where), CurateConfig())
    assert "bad-one" in str(err.value)


def test_missing_snapshot_is_a_stage_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="no download parquet"):
        open_snapshot(str(tmp_path), SNAP, CurateConfig())


def test_s3_root_gives_the_same_subsets_as_a_local_root(s3_root: str, tmp_path: Path) -> None:
    import webdataset as wds

    local = str(tmp_path / "local")
    rows = make_snapshot(s3_root, SNAP, shards=2, per_shard=40, seed=11)
    assert make_snapshot(local, SNAP, shards=2, per_shard=40, seed=11) == rows
    config = CurateConfig(rows_per_file=8)
    config.subsets = {
        "laion2B-en": SubsetConfig(where="language = 'en' AND similarity >= 0.28", write_images=True),
        "laion-aesthetics-6.5": CurateConfig().subsets["laion-aesthetics-6.5"],
    }
    remote = curate_snapshot(s3_root, SNAP, config)
    here = curate_snapshot(local, SNAP, config)
    for name in config.subsets:
        assert dict(remote[name].counts) == dict(here[name].counts)
        assert remote[name].checksum == here[name].checksum
        assert remote[name].output_uri.startswith("s3://")
    assert remote["laion-aesthetics-6.5"].extra["status"] == "unavailable"
    assert read_subset(s3_root, "laion2B-en") == read_subset(local, "laion2B-en")
    # The subset's tar on S3 holds the same samples.
    manifest = read_manifest(s3_root, SNAP, "laion2B-en")
    tar_uri = storage.join(layout.subset_dir(s3_root, SNAP, "laion2B-en"), "webdataset", "00000.tar")
    tmp_tar = tmp_path / "00000.tar"
    tmp_tar.write_bytes(storage.read_bytes(tar_uri))
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_tar), shardshuffle=False, empty_check=False)]
    assert keys == [r["key"] for r in read_subset(local, "laion2B-en")[0]]
    assert manifest["webdataset"]["samples"] == len(keys)


def test_cli_curate_records_lineage_and_skips_done_subsets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from laion_tasks.cli import app

    root = str(tmp_path / "root")
    make_snapshot(root, SNAP, shards=1, per_shard=30)
    monkeypatch.setenv("LAION_STORAGE__ROOT", root)
    monkeypatch.setenv("LAION_LINEAGE__URL", f"sqlite:///{tmp_path / 'lineage.db'}")
    runner = CliRunner()
    args = ["curate", "--snapshot", SNAP, "--subset", "laion2B-en", "--subset", "laion-aesthetics-6.5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["laion2B-en"]["counts"]["kept"] > 0
    assert report["laion-aesthetics-6.5"]["extra"]["status"] == "unavailable"
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.output[again.output.index("{") :]) == {
        "laion2B-en": {"skipped": True},
        "laion-aesthetics-6.5": {"skipped": True},
    }
    dry = runner.invoke(app, ["curate", "--snapshot", SNAP, "--dry-run", "--subset", "laion2B-en"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output[dry.output.index("{") :])["laion2B-en"]["outcomes"] == report["laion2B-en"]["counts"]


def test_clip_threshold_is_applied_in_curate(tmp_path: Path) -> None:
    """Changing clip.english.threshold changes the subsets without re-scoring (issue 12.4)."""
    from laion_tasks.config import ClipConfig, ClipModelConfig, Settings
    from laion_tasks.stages.clip import SPEC as CLIP_SPEC

    root = str(tmp_path / "root")
    rows = make_snapshot(root, SNAP, shards=2, per_shard=60, seed=5)
    stricter = ClipConfig(english=ClipModelConfig(threshold=0.35))
    assert CLIP_SPEC.config_digest(Settings(clip=stricter), "0") == CLIP_SPEC.config_digest(Settings(), "0")  # nothing re-scored
    config = CurateConfig(subsets={"en": CurateConfig().subsets["laion2B-en"]})
    stats = curate_snapshot(root, SNAP, config, clip=stricter)["en"]

    def expected(r: dict) -> str:
        if r["status"] != "success":
            return "drop:not_downloaded"
        if r["similarity"] is None:
            return "drop:not_clip_scored"
        if r["similarity"] < (0.26 if r["language_group"] == "multi" else 0.35):
            return "drop:clip_filtered"
        if r["hashlist_blocked"]:
            return "drop:hashlist_blocked"
        if r["language"] != "en":
            return "drop:predicate"
        return "drop:duplicate" if r["dup_of"] is not None else "kept"

    assert dict(stats.counts) == dict(Counter(expected(r) for r in rows))
    default = curate_snapshot(root, SNAP, config)["en"]
    assert default.counts["kept"] > stats.counts["kept"] > 0


class _RecordingCon:
    """A DuckDB connection that records the SQL it runs."""

    def __init__(self, con) -> None:  # type: ignore[no-untyped-def]
        self._con, self.sql_log = con, []

    def execute(self, sql: str, *args):  # type: ignore[no-untyped-def]
        self.sql_log.append(sql)
        return self._con.execute(sql, *args)

    def sql(self, sql: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.sql_log.append(sql)
        return self._con.sql(sql, *args, **kwargs)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._con, name)


def test_all_subsets_come_from_one_scan(tmp_path: Path) -> None:
    from laion_tasks.snapshot_db import SAMPLES_VIEW
    from laion_tasks.stages.curate import curate_subsets

    root = str(tmp_path / "root")
    make_snapshot(root, SNAP, shards=2, per_shard=40, seed=6)
    config = CurateConfig(rows_per_file=7)
    with open_snapshot(root, SNAP, config) as db:
        recorder = _RecordingCon(db.con)
        db.con = recorder  # type: ignore[assignment]
        results = curate_subsets(db, config.subsets, config)
    assert len(results) == 7
    scans = [q for q in recorder.sql_log if f"FROM {SAMPLES_VIEW}" in q and "LIMIT 0" not in q
             and "json_serialize_sql" not in q]
    assert len(scans) == 1, scans
    # and each subset still equals what curating it alone gives
    for name in ("laion2B-en", "research-safe"):
        alone = curate_subset(root, SNAP, name, config.subsets[name], config)
        assert dict(alone.counts) == dict(results[name].counts)
