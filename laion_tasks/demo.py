"""``make demo``: the whole pipeline on a real Airflow deployment, offline, on a generated fixture crawl.

1. Builds a small crawl in Common Crawl's layout (WAT files + wat.paths.gz + images)
   and serves it from a loopback HTTP server: extract reads the WATs over HTTP and
   download fetches the images, as in production.
2. Trains (or takes from its cache) the world model, a tiny CLIP trained here on a separate
   training set of the crawl's world (:mod:`laion_tasks.fixtures.world_model`), and writes a config
   that scores with it as with real weights (``clip.*.checkpoint``), with the thresholds its
   calibration measured; SQLite lineage, local storage. Starts Airflow's api-server, scheduler,
   dag-processor and triggerer (LocalExecutor, SQLite) with
   :class:`~laion_tasks.airflow_local.AirflowStack`.
3. Triggers the snapshot DAG through the REST API (as the UI's Trigger form does); its
   curate tasks' Asset events start the index and train -> eval DAGs.
4. Prints the funnel from lineage, the subsets, how the run compares with the truth the crawl
   planted (CLIP filter precision and recall, a search, zero-shot accuracy, near-duplicates,
   watermarks), the Airflow UI with its login and the lineage and search views, and leaves it
   all running with one command to stop it.

This module never imports Airflow: it drives the ``airflow`` CLI and REST API.
The e2e test uses :func:`run_snapshot_dag` (``airflow dags test``, one process); the
deployment tests use :func:`prepare` with PostgreSQL and S3 and their own stack.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from laion_tasks.airflow_local import AirflowStack
from laion_tasks.demo_config import (
    DEMO_CRAWL,
    comparison_config,
    config_header,
    demo_config,
)

if TYPE_CHECKING:
    from laion_tasks.fixtures.world_model import WorldModel

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@dataclass
class DemoEnv:
    work: Path
    config_path: Path
    env: dict[str, str]
    base_url: str
    server: subprocess.Popen[bytes]
    settings: dict[str, Any]
    crawl_dir: Path
    truth_path: Path
    """The fixture crawl's truth sidecar (what each link really is); the pipeline never reads it."""

    def stop(self) -> None:
        self.server.terminate()
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:
            self.server.kill()


def prepare(
    work: Path,
    storage_root: str | None = None,
    lineage_url: str | None = None,
    airflow_db_url: str | None = None,
    extra_config: dict[str, Any] | None = None,
    n_wat: int = 3,
    pages_per_wat: int = 8,
    cross_wat_duplicates: bool = False,
    world: WorldModel | None = None,
) -> DemoEnv:
    """Fixture crawl + loopback server + config + Airflow home; nothing is run yet.

    ``world``: score with the world model (:func:`laion_tasks.fixtures.world_model.ensure_world_model`);
    None keeps the seeded random tiny models, for tests that need no meaning."""
    from laion_tasks.fixtures.crawl import build_fixture_crawl

    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/"
    crawl_dir = work / "crawl"
    crawl = build_fixture_crawl(
        crawl_dir, base_url, DEMO_CRAWL, n_wat=n_wat, pages_per_wat=pages_per_wat, cross_wat_duplicates=cross_wat_duplicates
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "laion_tasks.fixtures.server", "--dir", str(crawl_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the demo's stop command ends it by group
    )
    wait_for_http(base_url + "robots.txt")
    storage_root = storage_root or str(work / "data")
    lineage_url = lineage_url or f"sqlite:///{work / 'data' / 'lineage.db'}"
    config = demo_config(work, base_url, storage_root, lineage_url, extra_config, world)
    config_path = work / "laion.yaml"
    config_path.write_text(config_header(world) + yaml.safe_dump(config, sort_keys=False))
    airflow_home = work / "airflow"
    airflow_home.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "LAION_CONFIG": str(config_path),
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_db_url or f"sqlite:///{airflow_home / 'airflow.db'}",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "NO_PROXY": "*",
            "no_proxy": "*",
        }
    )
    return DemoEnv(work, config_path, env, base_url, server, config, crawl_dir, crawl.truth_path)


def airflow(env: DemoEnv, *args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "airflow")
    proc = subprocess.run([exe, *args], env=env.env, text=True, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_snapshot_dag(env: DemoEnv, run_conf: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """Migrate the Airflow DB, create pools, and run the snapshot DAG once with ``airflow dags test``."""
    airflow(env, "db", "migrate")
    airflow(env, "pools", "set", "download", "4", "download concurrency")
    airflow(env, "pools", "set", "gpu", "1", "GPU pods")
    conf = {"wat_paths_uri": f"{env.base_url}crawl-data/{DEMO_CRAWL}/wat.paths.gz", **(run_conf or {})}
    dag_id = "laion_snapshot_" + DEMO_CRAWL.replace("-", "_")
    return dags_test(env, dag_id, conf)


def dags_test(env: DemoEnv, dag_id: str, conf: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """``airflow dags test``, then the run's state from Airflow's own database (not from its logs)."""
    args = ["dags", "test", dag_id] + (["--conf", json.dumps(conf)] if conf else [])
    proc = airflow(env, *args, check=False)
    runs = json.loads(_json_tail(airflow(env, "dags", "list-runs", dag_id, "-o", "json").stdout))
    state = max(runs, key=lambda r: r["run_after"])["state"] if runs else "missing"
    if proc.returncode != 0 or state != "success":
        raise RuntimeError(f"airflow dags test {dag_id}: run state {state}:\n{proc.stdout[-8000:]}\n{proc.stderr[-8000:]}")
    return proc


def _json_tail(output: str) -> str:
    """The JSON document at the end of a CLI output that may start with warnings."""
    for line in output.splitlines():
        if line.startswith("[{") or line.strip() == "[]":  # structlog lines start with "[warning  ]"
            return line
    return "[]"


def run_downstream_dags(env: DemoEnv) -> None:
    """The Asset-triggered DAGs, run directly with ``airflow dags test``: kNN index, and train -> eval -> card."""
    safe = DEMO_CRAWL.replace("-", "_")
    for dag_id in (f"laion_index_{safe}", f"laion_train_eval_{safe}"):
        dags_test(env, dag_id)


def print_report(env: DemoEnv) -> None:
    from laion_tasks import storage
    from laion_tasks.config import load_settings
    from laion_tasks.lineage import Lineage

    settings = load_settings(env.config_path, environ={})
    storage.configure(settings.storage)
    lineage = Lineage(settings.lineage.url)
    print(f"\nFunnel for {DEMO_CRAWL} (from lineage, {settings.lineage.url}):")
    print(f"  {'stage':<30} {'outcome':<34} {'count':>7} {'shards':>6}")
    for row in lineage.funnel(DEMO_CRAWL):
        if row.stage.startswith("dedup_"):
            continue  # dedup's intermediate steps; `laion funnel` shows them
        print(f"  {row.stage:<30} {row.outcome:<34} {row.count:>7} {row.shards:>6}")
    from laion_tasks.stages.curate import read_manifest

    print("\nSubsets:")
    for name in settings.curate.subsets:
        manifest = read_manifest(settings.storage.root, DEMO_CRAWL, name) or {}
        status = manifest.get("status", "missing")
        detail = f"{manifest.get('rows', 0)} rows" if status == "ok" else manifest.get("reason") or ""
        print(f"  {name:<24} {status:<12} {detail}")
    root = settings.storage.root
    print(f"\nOutputs under {root}/{DEMO_CRAWL}/:")
    for sub in ("candidates", "shards", "images", "clip", "tags", "dedup", "subsets", "card"):
        uris = storage.list_uris(storage.join(root, DEMO_CRAWL, sub))
        print(f"  {sub + '/':<12} {len(uris):>4} files")
    card = storage.join(root, DEMO_CRAWL, "card", "README.md")
    if storage.exists(card):
        print(f"\nDataset card: {card}")


def print_world_report(env: DemoEnv) -> None:
    """How the run compares with what the fixture crawl planted (the figures tests/world_checks.py bars)."""
    from laion_tasks import storage
    from laion_tasks.config import load_settings
    from laion_tasks.fixtures.world_report import measure

    settings = load_settings(env.config_path, environ={})
    storage.configure(settings.storage)
    english = settings.clip.english
    report = measure(settings, DEMO_CRAWL, env.truth_path, env.crawl_dir, english.model, english.checkpoint)
    print(f"\nAgainst the truth the fixture crawl planted ({env.truth_path}):")
    for line in report.lines():
        print(f"  {line}")


DEMO_USER = "laion"
SNAPSHOT_DAG = "laion_snapshot_" + DEMO_CRAWL.replace("-", "_")
ASSET_DAGS = tuple(f"laion_{kind}_{DEMO_CRAWL.replace('-', '_')}" for kind in ("index", "train_eval"))


def run_on_scheduler(env: DemoEnv, stack: AirflowStack, timeout: float = 1200) -> None:
    """Start the stack, trigger the snapshot DAG through the API, wait for it and the Asset-triggered DAGs."""
    started = time.time()
    stack.start()
    print(f"Airflow is up at {stack.base_url} ({time.time() - started:.0f}s); triggering {SNAPSHOT_DAG} through the REST API...", flush=True)
    for dag_id in (SNAPSHOT_DAG, *ASSET_DAGS):
        stack.unpause(dag_id)
    conf = {"wat_paths_uri": f"{env.base_url}crawl-data/{DEMO_CRAWL}/wat.paths.gz"}
    run_id = stack.trigger(SNAPSHOT_DAG, conf)
    state = stack.wait_run(SNAPSHOT_DAG, run_id, timeout)
    if state != "success":
        raise stack.error(f"{SNAPSHOT_DAG} {run_id}: {state}; tasks: {stack.task_states(SNAPSHOT_DAG, run_id)}")
    print(f"Snapshot run succeeded ({time.time() - started:.0f}s); waiting for the Asset-triggered index and train -> eval runs...", flush=True)
    for dag_id in ASSET_DAGS:
        runs = stack.wait_runs(dag_id, 1, timeout)
        failed = [r["dag_run_id"] for r in runs if r["state"] != "success"]
        if failed:
            raise stack.error(f"{dag_id}: runs {failed} failed; tasks: {stack.task_states(dag_id, failed[0])}")


def write_stop_script(env: DemoEnv, stack: AirflowStack) -> Path:
    """One command that stops every process group the demo left running."""
    pids = env.work / "demo.pids"
    pids.write_text(f"{env.server.pid} fixture-server\n")
    stop = env.work / "stop.sh"
    stop.write_text(
        "#!/bin/sh\n# Stops the demo's Airflow components and the fixture crawl server.\n"
        f"cd {REPO} && exec {sys.executable} -m laion_tasks.airflow_local stop {stack.pidfile} {pids}\n"
    )
    stop.chmod(0o755)
    return stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "demo-data")
    args = parser.parse_args()
    work = args.work.resolve()
    if work.exists():
        stop = work / "stop.sh"
        if stop.exists():  # a previous demo's servers
            subprocess.run(["sh", str(stop)], check=False)
        shutil.rmtree(work)
    started = time.time()
    from laion_tasks.fixtures.world_model import ensure_world_model, world_root

    print(f"World model: the demo's CLIP, trained here once and cached under {world_root()}...", flush=True)
    world = ensure_world_model(echo=lambda line: print(f"  {line}", flush=True))
    print(f"  {world.checkpoint} ({time.time() - started:.0f}s)", flush=True)
    env = prepare(work, extra_config=comparison_config(work), world=world)
    password = secrets.token_urlsafe(9)
    stack = AirflowStack(
        work / "airflow",
        dags_folder=REPO / "dags",
        plugins_folder=REPO / "plugins",
        extra_env={"LAION_CONFIG": str(env.config_path)},
        users={DEMO_USER: password},
    )
    stop = write_stop_script(env, stack)
    running = False
    try:
        print(f"Fixture crawl {DEMO_CRAWL} served at {env.base_url}; starting Airflow (LocalExecutor, SQLite)...", flush=True)
        run_on_scheduler(env, stack)
        print(f"All runs finished in {time.time() - started:.0f}s")
        print_report(env)
        print_world_report(env)
        running = True
        url = stack.base_url
        print(f"\nAirflow UI: {url}/  (user {DEMO_USER!r}, password {password!r})")
        print(f"  snapshot run:   {url}/dags/{SNAPSHOT_DAG}")
        print(f"  asset runs:     {url}/dags/{ASSET_DAGS[0]}  and  {url}/dags/{ASSET_DAGS[1]}")
        print(f"  LAION lineage:  {url}/laion-lineage/")
        print(f"  LAION search:   {url}/laion-search/  (images come from the fixture server {env.base_url})")
        print(f"  component logs: {stack.logs_dir}")
        print(f"\nStop everything the demo started: sh {stop}")
    finally:
        if not running:
            stack.stop()
            env.stop()
            stop.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
