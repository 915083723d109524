"""Worker processes start whatever the host's ``__main__`` is (issue #11, item 1).

In an Airflow task process ``__main__`` is the ``airflow`` console script; a child that re-runs
it initialises Airflow without a metadata-DB connection and dies, so every download failed in a
real deployment. Here the host is a script that raises when it is run a second time under
another name, and an ``airflow`` package that raises on import sits first on the path: the
download workers (two processes) and the CLIP DataLoader workers (two) must still do their work,
also in a host marked daemonic as a task process under Celery's prefork pool is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.download_fixtures import FixtureServer, make_jpeg

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)

HOST = '''
if __name__ != "__main__":
    # what the `airflow` console script does in a child that re-runs it: Airflow's settings
    # initialise, and inside a task process they cannot (no metadata-DB connection)
    raise RuntimeError(f"the host's __main__ was re-run in a worker process as {__name__!r}")
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
mode, out = sys.argv[2], sys.argv[3]
if mode == "download":
    from test_download import run_shard, test_config
    from pathlib import Path
    import pyarrow.parquet as pq
    _, _, parquet, stats = run_shard(Path(out), json.loads(sys.argv[4]), test_config(processes=2, max_concurrency=4))
    print(json.dumps([r["status"] for r in pq.read_table(parquet).to_pylist()]))
else:
    if mode == "clip-daemon":  # a task process forked from Celery's prefork pool inherits this mark
        import multiprocessing
        multiprocessing.current_process().daemon = True
    from clip_fixtures import FixtureSample, encode_image, synthetic_image, write_shard
    from test_clip_score import run, tiny_config
    from pathlib import Path
    samples = [FixtureSample(f"k{i}", f"a picture number {i}", encode_image(synthetic_image(i))) for i in range(12)]
    parquet, tar = write_shard(Path(out) / "shard", samples)
    stats, rows, _, _ = run(Path(out), parquet, tar, tiny_config(num_workers=2, batch_size=2, use_multilingual=False))
    print(json.dumps([r["clip_status"] for r in rows]))
import sys as _sys
assert "airflow" not in _sys.modules
'''


def _run_host(tmp_path: Path, mode: str, *args: str) -> list[str]:
    trap = tmp_path / "trap" / "airflow"
    trap.mkdir(parents=True)
    (trap / "__init__.py").write_text("raise ImportError('a worker imported airflow')\n")
    host = tmp_path / "host_script"  # no .py, like the `airflow` console script
    host.write_text(HOST)
    out = tmp_path / mode
    out.mkdir()
    paths = [str(trap.parent), str(REPO / "tests"), str(REPO)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = "not-a-url"  # as a task process sees it
    proc = subprocess.run(
        [sys.executable, str(host), json.dumps(paths), mode, str(out), *args],
        env=env,
        cwd=tmp_path,  # not the repo: only the host's sys.path may find laion_tasks
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "re-run in a worker" not in proc.stderr, proc.stderr[-4000:]
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_download_workers_start_from_any_main(tmp_path: Path) -> None:
    with FixtureServer() as srv:
        urls = [srv.static(f"/img/{i}.jpg", make_jpeg(color=(i * 20, 90, 30))) for i in range(8)]
        statuses = _run_host(tmp_path, "download", json.dumps([srv.url(u) for u in urls]))
        assert srv.counts  # the workers did fetch
    assert statuses == ["success"] * 8


@pytest.mark.parametrize("mode", ["clip", "clip-daemon"])
def test_clip_loader_workers_start_from_any_main(tmp_path: Path, mode: str) -> None:
    """``clip-daemon``: the host carries the daemon mark a Celery task process inherits."""
    statuses = _run_host(tmp_path, mode)
    assert len(statuses) == 12
    assert set(statuses) == {"scored"}  # every pair scored; thresholds are applied in curate
