"""``laion verify`` on a real snapshot (the fixture crawl through every stage, in this process): it passes
on a whole snapshot, and deleting one output file, one Parquet row or one dedup verdict makes it fail
with a line naming the shard."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_tasks import demo, layout, runner, storage
from laion_tasks.config import load_settings
from laion_tasks.lineage import Lineage
from laion_tasks.verify import verify_snapshot

SNAP = demo.DEMO_CRAWL
STAGES = ("extract", "download", "clip", "tag", "dedup_centroids", "dedup_partition", "dedup_bucket", "dedup", "curate")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("verify")
    env = demo.prepare(work, n_wat=2, pages_per_wat=3)
    try:
        settings = load_settings(env.config_path, environ={})
        storage.configure(settings.storage)
        runner.run_all(settings, SNAP, STAGES)
        yield env, settings
    finally:
        env.stop()


def _lines(settings) -> list[str]:  # type: ignore[no-untyped-def]
    return [p.line() for p in verify_snapshot(settings, SNAP, Lineage(settings.lineage.url))]


def _laion(env, *args: str) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    exe = Path(sys.executable).with_name("laion")
    return subprocess.run([str(exe), *args, "--config", str(env.config_path)], capture_output=True, text=True, timeout=300)


def test_a_whole_snapshot_verifies_through_the_cli(snapshot) -> None:  # type: ignore[no-untyped-def]
    env, settings = snapshot
    assert _lines(settings) == []
    done = _laion(env, "verify", "--snapshot", SNAP)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{SNAP}: verified" in done.stdout
    runs = [r for r in Lineage(settings.lineage.url).runs(SNAP, "verify")]
    assert runs and runs[-1]["status"] == "done"


def _mutated(path: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    backup = tmp_path / path.name
    shutil.copy2(path, backup)
    return backup


def test_a_deleted_output_names_its_shard(snapshot, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env, settings = snapshot
    shard = runner.spec("download").shards(runner.Context(settings, SNAP))[-1]
    target = storage.local_path(layout.tags_parquet_uri(settings.storage.root, SNAP, shard))
    backup = _mutated(target, tmp_path)
    target.unlink()
    try:
        lines = _lines(settings)
        assert any(line.startswith(f"outputs: tag shard {shard}: output ") and "missing" in line for line in lines), lines
        done = _laion(env, "verify", "--snapshot", SNAP)
        assert done.returncode == 1 and f"tag shard {shard}" in done.stdout
        runs = Lineage(settings.lineage.url).runs(SNAP, "verify")
        assert runs[-1]["status"] == "failed" and f"tag shard {shard}" in runs[-1]["error"]
    finally:
        shutil.copy2(backup, target)
    assert _lines(settings) == []


def test_a_deleted_parquet_row_names_its_shard(snapshot, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _env, settings = snapshot
    shard = runner.spec("download").shards(runner.Context(settings, SNAP))[0]
    target = storage.local_path(layout.clip_parquet_uri(settings.storage.root, SNAP, shard))
    backup = _mutated(target, tmp_path)
    table = pq.read_table(target)
    pq.write_table(table.slice(1), target)
    try:
        lines = _lines(settings)
        assert f"conservation: clip shard {shard}: parquet has {table.num_rows - 1} rows, the run recorded {table.num_rows}" in lines, lines
        assert any(line.startswith(f"outputs: clip shard {shard}:") and "sha256" in line for line in lines), lines
    finally:
        shutil.copy2(backup, target)


def test_a_deleted_dedup_verdict_names_its_shard(snapshot, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _env, settings = snapshot
    shard = runner.spec("download").shards(runner.Context(settings, SNAP))[-1]
    target = storage.local_path(storage.join(layout.dedup_dir(settings.storage.root, SNAP), f"{shard}.parquet"))
    backup = _mutated(target, tmp_path)
    table = pq.read_table(target)
    pq.write_table(table.slice(0, table.num_rows - 1), target)
    try:
        assert f"dedup coverage: dedup shard {shard}: 1 downloaded row(s) have no verdict" in _lines(settings)
    finally:
        shutil.copy2(backup, target)


def test_a_subset_row_that_is_not_eligible_is_named(snapshot, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _env, settings = snapshot
    import json

    from laion_tasks.stages.curate import read_manifest

    name = next(n for n in settings.curate.subsets if (read_manifest(settings.storage.root, SNAP, n) or {}).get("rows"))
    out_dir = Path(storage.local_path(layout.subset_dir(settings.storage.root, SNAP, name)))
    part = out_dir / read_manifest(settings.storage.root, SNAP, name)["parquet"][0]["name"]
    backup = _mutated(part, tmp_path)
    table = pq.read_table(part)
    images = pq.read_table(storage.local_path(layout.images_parquet_uri(
        settings.storage.root, SNAP, runner.spec("download").shards(runner.Context(settings, SNAP))[0])))
    failed = [k for k, s in zip(images.column("key").to_pylist(), images.column("status").to_pylist()) if s != "success"]
    assert failed, "the fixture crawl has failed downloads"
    keys = table.column("key").to_pylist()
    keys[0] = failed[0]
    pq.write_table(table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys)), part)
    try:
        lines = _lines(settings)
        assert any(line.startswith(f"subsets: curate shard {name}: row {failed[0]}") for line in lines), lines
    finally:
        shutil.copy2(backup, part)
    assert json.loads((out_dir / "manifest.json").read_text())["status"] == "ok"
