"""``laion clip`` (named files) and the shard-addressed ``laion clip-shard`` (what GPU pods run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner

from clip_fixtures import FixtureSample, encode_image, synthetic_image, write_shard
from laion_tasks import layout
from laion_tasks.cli import app
from laion_tasks.commands.run import split_shard_ids
from laion_tasks.lineage import Lineage

SNAPSHOT = "CC-MAIN-2024-10"


def write_config(tmp_path: Path, root: Path) -> Path:
    cfg = tmp_path / "laion.yaml"
    cfg.write_text(
        f"storage:\n  root: {root}\n"
        f"lineage:\n  url: sqlite:///{tmp_path / 'lineage.db'}\n"
        "clip:\n  device: cpu\n  num_workers: 1\n  batch_size: 4\n"
        "  english: {model: laion-tiny-clip, pretrained: null, threshold: 0.0}\n"
        "  multilingual: {model: laion-tiny-clip-multi, pretrained: null, threshold: 0.0}\n"
    )
    return cfg


def samples(n: int, seed: int) -> list[FixtureSample]:
    out = [FixtureSample(f"{seed:03d}{i:03d}", f"a picture number {i} of a red square", encode_image(synthetic_image(seed + i))) for i in range(n)]
    out.append(FixtureSample(f"{seed:03d}999", "failed download", None))
    return out


def test_split_shard_ids() -> None:
    assert split_shard_ids(["000001", "000002,000003", " 000004 , 000001 "]) == ["000001", "000002", "000003", "000004"]
    assert split_shard_ids(["['000005', '000006']"]) == ["000005", "000006"]


def test_clip_command(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, tmp_path / "data")
    parquet, tar = write_shard(tmp_path / "in", samples(3, 1))
    out = tmp_path / "out"
    args = [
        "clip", "--images-parquet", str(parquet), "--tar", str(tar),
        "--out-parquet", str(out / "s.parquet"), "--img-emb", str(out / "s.img.npy"),
        "--txt-emb", str(out / "s.txt.npy"), "--config", str(cfg),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output[result.output.index("{"):])
    assert sum(stats["counts"].values()) == 4 and stats["counts"]["skip:no_image"] == 1
    assert pq.read_table(out / "s.parquet").num_rows == 4
    assert np.load(out / "s.img.npy", mmap_mode="r").shape == (4, 64)
    assert not (tmp_path / "lineage.db").exists()  # no --snapshot: nothing recorded

    # with --snapshot: the runner records it under the shard's name, and skips it while current
    Lineage(f"sqlite:///{tmp_path / 'lineage.db'}").ensure_snapshot(SNAPSHOT, str(tmp_path / "data"))
    args += ["--snapshot", SNAPSHOT]
    assert CliRunner().invoke(app, args).exit_code == 0
    [run] = Lineage(f"sqlite:///{tmp_path / 'lineage.db'}").runs(SNAPSHOT, "clip")
    assert (run["shard_id"], run["status"], run["input_uri"], run["output_uri"]) == (parquet.stem, "done", str(parquet), str(out / "s.parquet"))
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and json.loads(again.output[again.output.index("{"):]) == {"skipped": True}


def test_clip_shard_command_uses_layout_and_lineage(tmp_path: Path) -> None:
    root = tmp_path / "data"
    cfg = write_config(tmp_path, root)
    for shard, seed in (("000000", 10), ("000001", 20)):
        parquet, tar = write_shard(tmp_path / "dl" / shard, samples(2, seed), name=shard)
        Path(layout.images_parquet_uri(str(root), SNAPSHOT, shard)).parent.mkdir(parents=True, exist_ok=True)
        Path(layout.images_parquet_uri(str(root), SNAPSHOT, shard)).write_bytes(parquet.read_bytes())
        Path(layout.images_tar_uri(str(root), SNAPSHOT, shard)).write_bytes(tar.read_bytes())
    args = ["clip-shard", "--snapshot", SNAPSHOT, "--shard", "000000,000001", "--config", str(cfg)]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    for shard in ("000000", "000001"):
        assert Path(layout.clip_parquet_uri(str(root), SNAPSHOT, shard)).exists()
        assert np.load(layout.clip_image_emb_uri(str(root), SNAPSHOT, shard), mmap_mode="r").shape == (3, 64)
        assert np.load(layout.clip_text_emb_uri(str(root), SNAPSHOT, shard), mmap_mode="r").shape == (3, 64)
    lineage = Lineage(f"sqlite:///{tmp_path / 'lineage.db'}")
    runs = lineage.runs(SNAPSHOT, "clip")
    assert [(r["shard_id"], r["status"]) for r in runs] == [("000000", "done"), ("000001", "done")]
    assert lineage.outcomes(runs[0]["id"])["skip:no_image"] == 1
    assert sum(lineage.outcomes(runs[0]["id"]).values()) == 3

    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    report = json.loads(second.output[second.output.index("{"):])
    assert (report["done"], report["skipped"]) == (0, 2)
    assert len(lineage.runs(SNAPSHOT, "clip")) == 2

    # An execution-only knob (batch size, device) re-runs nothing: the same `laion run clip` skips.
    rerun = runner.invoke(app, ["run", "clip", "--snapshot", SNAPSHOT, "--shard", "000000,000001", "--no-force", "--config", str(cfg)],
                          env={"LAION_CLIP__BATCH_SIZE": "3"})
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.output[rerun.output.index("{"):])["clip"]["skipped"] == 2

    # A vanished output is not trusted: that shard runs again.
    Path(layout.clip_parquet_uri(str(root), SNAPSHOT, "000001")).unlink()
    third = runner.invoke(app, args)
    assert third.exit_code == 0, third.output
    assert [r["status"] for r in lineage.runs(SNAPSHOT, "clip")] == ["done", "superseded", "done"]


def test_clip_shard_missing_input_is_recorded_as_failed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    cfg = write_config(tmp_path, root)
    Lineage(f"sqlite:///{tmp_path / 'lineage.db'}").ensure_snapshot(SNAPSHOT, str(root))  # a known snapshot, its shard missing
    result = CliRunner().invoke(app, ["clip-shard", "--snapshot", SNAPSHOT, "--shard", "000042", "--config", str(cfg)])
    assert result.exit_code == 2 and "000042" in result.output
    runs = Lineage(f"sqlite:///{tmp_path / 'lineage.db'}").runs(SNAPSHOT, "clip")
    assert runs[-1]["status"] == "failed" and "000042.parquet" in runs[-1]["error"]
