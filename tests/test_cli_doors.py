"""Every ``laion`` stage command is a door onto the runner: the installed entry point, run as a
user would, does the stage's own run and records it in lineage as ``laion run`` does.

The single-shard tools on named files (``extract``, ``regroup``, ``download``) pass their files to
the runner as context options; with ``--snapshot`` the run is recorded and, when current, skipped.
``laion download`` therefore honours the hash lists exactly as the pipeline does.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from laion_tasks import layout
from laion_tasks.fixtures.wat import FixturePage, write_wat
from laion_tasks.lineage import Lineage
from tests.download_fixtures import FixtureServer, make_jpeg, redirect, write_shard

LAION = str(Path(sys.executable).with_name("laion"))
CRAWL = "CC-MAIN-2024-10"
PACKAGE = Path(__file__).resolve().parents[1] / "laion_tasks"


def write_config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "laion.yaml"
    config.write_text(f"storage:\n  root: {tmp_path / 'data'}\nlineage:\n  url: sqlite:///{tmp_path / 'lineage.db'}\n{extra}")
    return config


def laion(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run the installed ``laion`` with our config only; it must succeed; its stdout is JSON."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LAION_")}
    base.update({"LAION_CONFIG": str(tmp_path / "laion.yaml"), **(env or {})})
    result = subprocess.run([LAION, *args], cwd=tmp_path, env=base, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


def runs(tmp_path: Path, stage: str) -> list[dict]:
    return Lineage(f"sqlite:///{tmp_path / 'lineage.db'}").runs(CRAWL, stage)


def test_extract_on_a_named_file_records_and_skips_like_laion_run(tmp_path: Path) -> None:
    write_config(tmp_path)
    wat, out = tmp_path / "x.warc.wat.gz", tmp_path / "out" / "x.parquet"
    page = FixturePage(url="http://example.com/p.html", date="2024-02-20T10:00:00Z",
                       images=[("/a.jpg", "A red circle on a white table"), ("/b.jpg", "A blue square on the floor")])
    write_wat(wat, [page])

    stats = laion(tmp_path, "extract", str(wat), str(out))  # no snapshot: runs, records nothing
    assert stats["counts"] == {"kept": 2} and stats["output_uri"] == str(out)
    assert not (tmp_path / "lineage.db").exists() and not (tmp_path / "data").exists()

    recorded = laion(tmp_path, "extract", str(wat), str(out), "--snapshot", CRAWL)
    assert recorded["counts"] == {"kept": 2}
    [run] = runs(tmp_path, "extract")
    assert (run["shard_id"], run["status"], run["input_uri"], run["output_uri"]) == (layout.wat_id(str(wat)), "done", str(wat), str(out))

    assert laion(tmp_path, "extract", str(wat), str(out), "--snapshot", CRAWL) == {"skipped": True}
    assert len(runs(tmp_path, "extract")) == 1

    # the same path with new content: the named input is keyed by content, so it runs again
    write_wat(wat, [page, FixturePage(url="http://example.com/q.html", date="2024-02-20T10:00:00Z",
                                      images=[("/c.jpg", "Three green triangles in a row")])])
    assert laion(tmp_path, "extract", str(wat), str(out), "--snapshot", CRAWL)["counts"] == {"kept": 3}
    assert [r["status"] for r in runs(tmp_path, "extract")] == ["superseded", "done"]
    assert pq.read_table(out).num_rows == 3


def test_download_blocks_hash_listed_urls_and_images_and_records_its_run(tmp_path: Path) -> None:
    """The bug this door fixes: ``laion download`` used to pass no hash lists, so it fetched and stored what they list."""
    listed_image = make_jpeg(color=(1, 2, 3))
    clean = make_jpeg(color=(250, 250, 250))
    with FixtureServer() as srv:
        srv.static("/listed.jpg", clean)
        srv.static("/listed-image.jpg", listed_image)
        srv.static("/clean.jpg", clean)
        srv.routes["/redirect-to-listed"] = redirect("/listed.jpg")
        listed_url = srv.url("/listed.jpg")
        (tmp_path / "urls.txt").write_text(f"md5:{hashlib.md5(listed_url.encode()).hexdigest()}\n")
        (tmp_path / "images.txt").write_text(f"sha256:{hashlib.sha256(listed_image).hexdigest()}\n")
        write_config(tmp_path, f"hashlists:\n  url: {tmp_path / 'urls.txt'}\n  image: {tmp_path / 'images.txt'}\n")
        env = {"LAION_DOWNLOAD__ALLOW_PRIVATE_NETWORKS": "true", "LAION_DOWNLOAD__RETRIES": "0", "LAION_DOWNLOAD__PROCESSES": "1"}
        (tmp_path / "cand").mkdir()
        urls = [listed_url, srv.url("/redirect-to-listed"), srv.url("/listed-image.jpg"), srv.url("/clean.jpg")]
        write_shard(tmp_path / "cand" / "x.parquet", urls, with_key=False)

        plan = laion(tmp_path, "regroup", str(tmp_path / "cand"), "--shards-dir", str(tmp_path / "shards"), "--shard-size", "10")
        shard = str(tmp_path / "shards" / "000000.parquet")
        assert plan == {"shards": 1, "first": shard}
        manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
        assert list(manifest["shards"]) == ["000000"] and manifest["shard_size"] == 10

        Lineage(f"sqlite:///{tmp_path / 'lineage.db'}").ensure_snapshot(CRAWL, str(tmp_path / "data"))
        tar, parquet = tmp_path / "images" / "000000.tar", tmp_path / "images" / "000000.parquet"
        stats = laion(tmp_path, "download", shard, str(tar), str(parquet), "--snapshot", CRAWL, env=env)
        assert srv.seen("/listed.jpg") == 0, "a hash-listed URL was requested"
    assert stats["counts"] == {"fail:blocked_hashlist": 3, "success": 1}
    rows = pq.read_table(parquet).to_pylist()
    assert [r["status"] for r in rows] == ["blocked_hashlist"] * 3 + ["success"]
    assert listed_image not in tar.read_bytes()
    [run] = runs(tmp_path, "download")
    assert (run["shard_id"], run["status"], run["input_uri"], run["output_uri"]) == ("000000", "done", shard, str(parquet))
    assert laion(tmp_path, "download", shard, str(tar), str(parquet), "--snapshot", CRAWL, env=env) == {"skipped": True}


def test_a_failed_named_file_run_is_one_error_line_and_recorded_failed(tmp_path: Path) -> None:
    write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAION_")} | {"LAION_CONFIG": str(tmp_path / "laion.yaml")}
    missing = tmp_path / "none.warc.wat.gz"
    result = subprocess.run([LAION, "extract", str(missing), str(tmp_path / "o.parquet"), "--snapshot", CRAWL],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    assert errors[0].startswith(f"error: extract: {layout.wat_id(str(missing))} ({missing}): ") and "FileNotFoundError" in errors[0]
    [run] = runs(tmp_path, "extract")
    assert run["status"] == "failed" and str(missing) in run["error"]


def stage_run_calls(path: Path) -> list[int]:
    """Lines of ``path`` that call ``StageRun(...)`` (by name or as an attribute)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name == "StageRun":
                lines.append(node.lineno)
    return lines


def test_only_the_runner_constructs_a_stage_run() -> None:
    """Commands, stages and the DAG go through the runner's entry points; none builds its own skip key."""
    runner = PACKAGE / "runner.py"
    assert stage_run_calls(runner), "the check finds the runner's own calls"
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in sorted(PACKAGE.rglob("*.py")) if path != runner
                 for line in stage_run_calls(path)]
    assert offenders == []
