"""The stage declarations and the generic runner, without Airflow: knobs, plans, skip keys, outputs."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_tasks import layout, runner, storage
from laion_tasks.config import Settings, load_settings
from laion_tasks.lineage import Lineage
from laion_tasks.stage import EXECUTION_ONLY as STAGE_EXECUTION_ONLY

# Knobs that only change how fast or where a stage runs, never what it writes (one list, with reasons;
# tests/test_result_fields.py checks that each stage reads nothing else outside its key). Query-time knobs
# of the index are not build knobs either.
EXECUTION_ONLY = (*STAGE_EXECUTION_ONLY, "index.nprobe", "index.k_factor")


@pytest.mark.parametrize("name", list(runner.STAGE_MODULES))
def test_result_fields_hold_no_execution_knob(name: str) -> None:
    spec = runner.spec(name)
    assert spec.name == name
    fields = spec.knobs(Settings(), "laion2B-en")
    assert fields, name
    leaked = [f for f in fields if any(fnmatch.fnmatchcase(f, pattern) for pattern in EXECUTION_ONLY)]
    assert leaked == [], (name, leaked)
    for upstream in spec.reads:
        assert upstream in runner.STAGE_MODULES


def test_knob_paths_and_globs() -> None:
    settings = Settings()
    assert set(settings.knobs(["clip.*.threshold"])) == {"clip.english.threshold", "clip.multilingual.threshold"}
    with pytest.raises(KeyError):
        settings.knobs(["clip.no_such_knob"])
    # a subset name with a dot is one shard, and only its own predicate is in its digest
    curate = runner.spec("curate")
    a = curate.config_digest(settings, "laion-aesthetics-6.5")
    changed = Settings.model_validate({"curate": {"subsets": {**settings.model_dump()["curate"]["subsets"],
                                                               "laion2B-en": {"where": "true"}}}})
    assert curate.config_digest(changed, "laion-aesthetics-6.5") == a
    assert curate.config_digest(changed, "laion2B-en") != curate.config_digest(settings, "laion2B-en")


def test_tag_prompt_changes_tag_not_download() -> None:
    base, moved = Settings(), Settings.model_validate({"tag": {"nsfw_prompts": ["porn"]}})
    for name, changes in (("download", False), ("clip", False), ("tag", True), ("curate", False)):
        spec = runner.spec(name)
        assert (spec.config_digest(base, "x") != spec.config_digest(moved, "x")) is changes, name


def test_pod_env_carries_the_stage_knobs() -> None:
    settings = Settings.model_validate({"langid": {"threshold": 0.7, "model_path": "/m/lid.176.bin"}})
    env = runner.stage_env(settings, runner.spec("clip"))
    assert "LAION_CLIP" in env and "LAION_LANGID__THRESHOLD" in env
    inside = load_settings(environ=env)
    clip = runner.spec("clip")
    assert clip.knobs(inside, "000000") == clip.knobs(settings, "000000")


def test_output_exists_needs_files(tmp_path: Path, s3_root: str) -> None:
    empty = tmp_path / "out"
    empty.mkdir()
    assert not storage.output_exists(str(empty))
    (empty / "000000.parquet").write_bytes(b"x")
    assert storage.output_exists(str(empty)) and storage.output_exists(str(empty / "000000.parquet"))
    prefix = storage.join(s3_root, "dedup")
    assert not storage.output_exists(prefix)
    storage.write_bytes(storage.join(prefix, "000000.parquet"), b"x")
    assert storage.output_exists(prefix), "an S3 prefix with objects is an output"


def _candidates(root: str, snapshot: str, wat: str, n: int) -> None:
    uri = layout.candidates_uri(root, snapshot, wat)
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"uid": [f"{wat}-{i}" for i in range(n)], "url": [f"http://x/{wat}/{i}" for i in range(n)]}), uri)


def test_download_plan_appends_new_candidates_to_new_shards(tmp_path: Path) -> None:
    root, snap = str(tmp_path / "data"), "S"
    settings = load_settings(environ={}, overrides={
        "storage": {"root": root}, "lineage": {"url": f"sqlite:///{tmp_path / 'l.db'}"}, "download": {"shard_size": 4}})
    manifest = layout.wat_manifest_uri(root, snap)
    Path(manifest).parent.mkdir(parents=True, exist_ok=True)
    Path(manifest).write_text("http://cc/a.warc.wat.gz\nhttp://cc/b.warc.wat.gz\n")
    a, b = (layout.wat_id(f"http://cc/{w}.warc.wat.gz") for w in "ab")
    _candidates(root, snap, a, 5)
    _candidates(root, snap, b, 2)
    ctx = runner.open_context(settings, snap)
    first = runner.spec("download").plan(ctx)
    assert first == ["000000", "000001"]  # 7 rows in shards of 4
    before = {s: Path(layout.shard_input_uri(root, snap, s)).read_bytes() for s in first}

    Path(manifest).write_text(Path(manifest).read_text() + "http://cc/c.warc.wat.gz\n")
    _candidates(root, snap, layout.wat_id("http://cc/c.warc.wat.gz"), 3)
    grown = runner.spec("download").plan(runner.open_context(settings, snap))  # a new task: a new context
    assert grown == ["000000", "000001", "000002"], "new candidates go to a new shard"
    assert {s: Path(layout.shard_input_uri(root, snap, s)).read_bytes() for s in first} == before

    # shard 000002 was downloaded; then an old candidates file changes and the plan is recut
    from laion_tasks.runner import StageRun, run_stage
    from laion_tasks.stage import ShardStats

    images = layout.images_parquet_uri(root, snap, "000002")
    Path(images).parent.mkdir(parents=True, exist_ok=True)
    Path(images).write_bytes(b"x")
    run_stage(ctx.lineage, StageRun(snap, "download", "000002", "in", "k", output_uri=images), lambda: ShardStats())
    _candidates(root, snap, a, 1)
    ctx = runner.open_context(settings, snap)
    assert runner.plan(ctx, "download") == [{"start": 0, "stop": 1}, {"start": 1, "stop": 2}]
    recut = runner.spec("download").shards(ctx)
    assert recut == ["000000", "000001"]
    assert not Path(layout.shard_input_uri(root, snap, "000002")).exists()
    assert not Path(images).exists(), "a shard that left the plan leaves no output for curate to read"
    assert [r["status"] for r in ctx.lineage.runs(snap, "download")] == ["superseded"]
    rows = sum(pq.ParquetFile(layout.shard_input_uri(root, snap, s)).metadata.num_rows for s in recut)
    assert rows == 1 + 2 + 3


def test_skip_key_follows_upstream_runs(tmp_path: Path) -> None:
    """A shard's inputs digest moves when an upstream run of the same shard is replaced."""
    settings = load_settings(environ={}, overrides={
        "storage": {"root": str(tmp_path / "d")}, "lineage": {"url": f"sqlite:///{tmp_path / 'l.db'}"}})
    ctx = runner.open_context(settings, "S")
    clip = runner.spec("clip")
    before = runner.inputs_digest(ctx, clip, "000000")
    other = runner.inputs_digest(ctx, clip, "000001")
    from laion_tasks.runner import StageRun, run_stage
    from laion_tasks.stage import ShardStats

    assert isinstance(ctx.lineage, Lineage)
    run_stage(ctx.lineage, StageRun("S", "download", "000000", "in", "k"), lambda: ShardStats())
    after = runner.inputs_digest(ctx, clip, "000000")
    assert after != before
    assert runner.inputs_digest(ctx, clip, "000001") == other, "another shard's upstream is not this shard's input"
