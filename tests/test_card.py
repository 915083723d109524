"""Dataset card: files, funnel numbers from lineage and Parquet, safe sample grids, per-subset cards."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate_fixtures import expected_base_outcome, make_snapshot
from laion_tasks import layout, storage
from laion_tasks.card import write_dataset_card
from laion_tasks.card.facts import _sample_rows
from laion_tasks.config import CurateConfig
from laion_tasks.lineage import Lineage
from laion_tasks.runner import StageRun, run_stage
from laion_tasks.snapshot_db import open_snapshot
from laion_tasks.stage import ShardStats
from laion_tasks.stages.curate import curate_snapshot, eligible_sql

SNAP = "CC-TEST-2024-02"
CHARTS = ["funnel.png", "similarity.png", "image_size.png", "languages.png", "samples_kept.png", "samples_dropped.png"]


def record_upstream(lineage: Lineage, root: str, rows: list[dict], download_offset: int = 0) -> dict[str, int]:
    """Done records for extract / download / clip as those stages would write them."""
    lineage.ensure_snapshot(SNAP, root)
    extract = Counter({"kept": 0, "drop:alt_too_short": 0})
    for wat in range(3):
        counts = Counter({"kept": 70 + wat, "drop:alt_too_short": 11 + wat})
        extract.update(counts)
        run_stage(lineage, StageRun(SNAP, "extract", f"wat-{wat}", "in", "d"), lambda c=counts: ShardStats(counts=c))
    for shard in sorted({r["shard"] for r in rows}):
        mine = [r for r in rows if r["shard"] == shard]
        dl = Counter("success" if r["status"] == "success" else r["status"] for r in mine)
        dl["success"] += download_offset
        clip = Counter("kept" if r["clip_status"] == "kept" else f"drop:{r['clip_status']}" for r in mine)
        run_stage(lineage, StageRun(SNAP, "download", shard, "in", "d"), lambda c=dl: ShardStats(counts=c))
        run_stage(lineage, StageRun(SNAP, "clip", shard, "in", "d"), lambda c=clip: ShardStats(counts=c))
    return {"links": sum(extract.values()), "candidates": extract["kept"]}


@pytest.fixture(scope="module")
def carded(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("card")
    root = str(base / "root")
    rows = make_snapshot(root, SNAP, shards=3, per_shard=50, seed=2)
    lineage = Lineage(f"sqlite:///{base / 'lineage.db'}")
    numbers = record_upstream(lineage, root, rows)
    config = CurateConfig(rows_per_file=10)
    results = curate_snapshot(root, SNAP, config)
    uri = write_dataset_card(root, SNAP, lineage, results, config=config)
    return root, rows, numbers, results, uri


def test_card_files_exist_and_charts_are_pngs(carded) -> None:
    root, _rows, _numbers, _results, uri = carded
    card_dir = Path(layout.card_dir(root, SNAP))
    assert Path(uri) == card_dir / "README.md"
    for name in CHARTS:
        with Image.open(card_dir / name) as img:
            assert img.format == "PNG" and img.size[0] > 200
    text = Path(uri).read_text()
    for name in CHARTS:
        assert f"({name})" in text


def test_card_shows_the_funnel_numbers(carded) -> None:
    _root, rows, numbers, results, uri = carded
    text = Path(uri).read_text()
    base = Counter(expected_base_outcome(r) for r in rows)
    downloaded = sum(1 for r in rows if r["status"] == "success")
    assert "WAT files processed: **3**" in text
    assert f"links seen in WAT (extract input): **{numbers['links']:,}**" in text
    assert f"candidates (extract kept): **{numbers['candidates']:,}**" in text
    assert f"download attempts: **{len(rows):,}**" in text
    assert f"downloaded: **{downloaded:,}**" in text
    assert f"not hash-listed (eligible): **{base['eligible']:,}**" in text
    eligible_dups = sum(1 for r in rows if expected_base_outcome(r) == "eligible" and r["dup_of"] is not None)
    assert eligible_dups and f"after snapshot-wide dedup: **{base['eligible'] - eligible_dups:,}**" in text
    for reason in ("drop:not_downloaded", "drop:clip_filtered", "drop:hashlist_blocked"):
        assert f"(`{reason}`) | {base[reason]:,} |" in text
    for name, stats in results.items():
        if stats.extra["status"] == "ok":
            assert f"subset {name}: **{stats.counts['kept']:,}**" in text
    # Lineage and Parquet agree here, and the card says so.
    assert "| download rows: lineage vs images parquet | 150 | 150 | ok |" in text
    assert "MISMATCH" not in text
    assert "| extract | drop:alt_too_short | 36 | 3 |" in text


def test_card_reports_unavailable_subset_and_writes_subset_cards(carded) -> None:
    root, rows, _numbers, results, uri = carded
    text = Path(uri).read_text()
    assert "| [laion-aesthetics-6.5](../subsets/laion-aesthetics-6.5/README.md) | unavailable | 0 |" in text
    assert "aesthetic_score are NULL" in text
    for name, stats in results.items():
        sub = Path(layout.subset_dir(root, SNAP, name)) / "README.md"
        body = sub.read_text()
        assert f"**total** | **{len(rows):,}**" in body  # every sample counted once
        assert f"**samples:** {stats.extra['rows']:,}" in body
        if stats.extra["status"] == "ok" and stats.counts.get("kept"):
            assert "similarity.png" in body and (sub.parent / "similarity.png").exists()
            assert "part-00000.parquet" in body


def test_sample_grids_never_show_blocked_unsafe_or_unscored_samples(tmp_path: Path) -> None:
    root = str(tmp_path)
    rows = make_snapshot(root, SNAP, shards=2, per_shard=80, seed=4)
    # Tag could not score some downloaded images (punsafe / nsfw_text null): not known to be safe.
    tags_uri = layout.tags_parquet_uri(root, SNAP, rows[0]["shard"])
    tags = pq.read_table(tags_uri).to_pylist()
    for i, tag in enumerate(tags):
        if i % 5 == 0:
            tag["punsafe" if i % 2 else "nsfw_text"] = None
    pq.write_table(pa.Table.from_pylist(tags, schema=pq.read_schema(tags_uri)), tags_uri)
    by_key = {t["key"]: t for t in tags}
    for r in rows:
        if r["key"] in by_key:
            r["punsafe"], r["nsfw_text"] = by_key[r["key"]]["punsafe"], by_key[r["key"]]["nsfw_text"]
    unscored = {r["key"] for r in rows if r["status"] == "success" and (r["punsafe"] is None or r["nsfw_text"] is None)}
    assert unscored, "the fixture must contain downloaded images without a safety score"
    blocked = {r["key"] for r in rows if r["hashlist_blocked"] or r["key"] in unscored or (r["punsafe"] or 0) >= 0.5}
    config = CurateConfig()
    with open_snapshot(root, SNAP, config) as db:
        kept = _sample_rows(db, eligible_sql(config), 10_000, config)
        dropped = _sample_rows(db, "base_outcome <> 'eligible'", 10_000, config)
    assert kept and dropped
    assert not blocked & {s["key"] for s in kept + dropped}
    assert {s["outcome"] for s in kept} == {"eligible"}
    assert "drop:clip_filtered" in {s["outcome"] for s in dropped}
    safe_blocked_candidates = [r for r in rows if r["hashlist_blocked"] and r["status"] == "success"]
    assert safe_blocked_candidates, "the fixture must contain blocked images for this test to mean anything"


def test_card_flags_lineage_parquet_mismatch_and_works_without_curate(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    rows = make_snapshot(root, SNAP, shards=2, per_shard=30, seed=6)
    lineage = Lineage(f"sqlite:///{tmp_path / 'lineage.db'}")
    record_upstream(lineage, root, rows, download_offset=1)
    uri = write_dataset_card(root, SNAP, lineage, None, str(tmp_path / "out"))
    text = Path(uri).read_text()
    assert "**MISMATCH**" in text
    assert "| [laion2B-en](../subsets/laion2B-en/README.md) | not written |" in text  # counted, not yet written
    assert "| [laion-aesthetics-6.5](../subsets/laion-aesthetics-6.5/README.md) | unavailable |" in text


def test_card_on_s3_root_without_lineage(s3_root: str) -> None:
    rows = make_snapshot(s3_root, SNAP, shards=1, per_shard=30, seed=8)
    config = CurateConfig()
    config.subsets = {"laion2B-en": config.subsets["laion2B-en"]}
    results = curate_snapshot(s3_root, SNAP, config)
    uri = write_dataset_card(s3_root, SNAP, None, results, config=config)
    assert uri.startswith("s3://")
    text = storage.read_text(uri)
    assert f"download attempts: **{len(rows):,}**" in text and "no lineage database" in text
    png = storage.read_bytes(storage.join(layout.card_dir(s3_root, SNAP), "samples_kept.png"))
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert storage.exists(storage.join(layout.subset_dir(s3_root, SNAP, "laion2B-en"), "README.md"))


def test_cli_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from laion_tasks.cli import app

    root = str(tmp_path / "root")
    make_snapshot(root, SNAP, shards=1, per_shard=20)
    monkeypatch.setenv("LAION_STORAGE__ROOT", root)
    result = CliRunner().invoke(app, ["card", "--snapshot", SNAP, "--no-lineage"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("README.md")
    assert (Path(layout.card_dir(root, SNAP)) / "funnel.png").exists()
