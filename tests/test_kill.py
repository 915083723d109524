"""SIGKILL in the middle of a shard, then a re-run: outputs identical to an uninterrupted run,
no half-written output under a final name, and one done lineage record per shard."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from laion_tasks import layout
from laion_tasks.config import load_settings
from laion_tasks.fixtures.crawl import build_fixture_crawl
from laion_tasks.lineage import Lineage

SNAP = "CC-MAIN-2000-01"


class SlowHandler(http.server.SimpleHTTPRequestHandler):
    """Each image takes 0.15 s, so a shard takes seconds and can be killed midway."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/img/"):
            time.sleep(0.15)
        super().do_GET()


@pytest.fixture
def slow_crawl(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(SlowHandler, directory=str(tmp_path / "crawl")))
    server.daemon_threads = True
    base = f"http://127.0.0.1:{server.server_port}/"
    crawl = build_fixture_crawl(tmp_path / "crawl", base, SNAP, n_wat=1, pages_per_wat=8)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield crawl, base
    server.shutdown()


def _config(tmp_path: Path, name: str, base: str) -> Path:
    cfg = {
        "storage": {"root": str(tmp_path / name / "data")},
        "lineage": {"url": f"sqlite:///{tmp_path / name / 'lineage.db'}"},
        "extract": {"cc_base_url": base},
        "download": {
            "shard_size": 1000,
            "allow_private_networks": True,
            "max_concurrency": 2,
            "max_per_host": 2,
            "retries": 0,
            "processes": 1,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


RUN = """
import json, sys
from laion_tasks import runner
from laion_tasks.config import load_settings
settings = load_settings(sys.argv[1])
ctx = runner.open_context(settings, sys.argv[2])
for batch in runner.plan(ctx, "extract"):
    runner.run_batch(ctx, "extract", batch)
for batch in runner.plan(ctx, "download"):
    print("DOWNLOADING", flush=True)
    runner.run_batch(ctx, "download", batch)
print("DONE", flush=True)
"""


def _run(config: Path, kill_after: float | None = None) -> subprocess.CompletedProcess[str] | None:
    env = {**os.environ, "LAION_CONFIG": str(config)}
    if kill_after is None:
        return subprocess.run([sys.executable, "-c", RUN, str(config), SNAP], env=env, text=True, capture_output=True, check=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, str(config), SNAP], env=env, text=True, stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "DOWNLOADING"
    time.sleep(kill_after)
    assert proc.poll() is None, "the shard finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and any worker processes it started
    proc.wait()
    return None


def _tar_members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_sigkill_mid_shard_then_rerun_is_identical(tmp_path: Path, slow_crawl) -> None:  # type: ignore[no-untyped-def]
    _, base = slow_crawl
    killed_cfg, clean_cfg = _config(tmp_path, "killed", base), _config(tmp_path, "clean", base)

    _run(killed_cfg, kill_after=1.5)
    settings = load_settings(killed_cfg, environ={})
    root = settings.storage.root
    shard = layout.shard_name(0)
    tar_uri, meta_uri = layout.images_tar_uri(root, SNAP, shard), layout.images_parquet_uri(root, SNAP, shard)
    assert not Path(tar_uri).exists() and not Path(meta_uri).exists(), "a killed shard must not look finished"
    lineage = Lineage(settings.lineage.url)
    assert [r["status"] for r in lineage.runs(SNAP, "download")] == ["running"]

    _run(killed_cfg)  # the re-run
    _run(clean_cfg)  # an uninterrupted run elsewhere
    clean_root = load_settings(clean_cfg, environ={}).storage.root

    killed_table = pq.read_table(meta_uri)
    clean_table = pq.read_table(layout.images_parquet_uri(clean_root, SNAP, shard))
    assert killed_table.num_rows > 0
    assert killed_table.equals(clean_table)
    assert _tar_members(tar_uri) == _tar_members(layout.images_tar_uri(clean_root, SNAP, shard))

    runs = lineage.runs(SNAP, "download")
    assert [r["status"] for r in runs].count("done") == 1
    assert sum(lineage.outcomes([r for r in runs if r["status"] == "done"][0]["id"]).values()) == killed_table.num_rows
    # SIGKILL can leave a hidden temp file (".000000.tar.tmp-1a2b"), never a file under a final name;
    # listings skip hidden files, so the shard set is exactly the uninterrupted run's.
    final_names = sorted(p.name for p in Path(root, SNAP, "images").iterdir() if not p.name.startswith("."))
    assert final_names == sorted(p.name for p in Path(clean_root, SNAP, "images").iterdir() if not p.name.startswith("."))
