"""A real Airflow 3 deployment on loopback: api-server, scheduler, dag-processor, triggerer
(and a Celery worker), each the venv's ``airflow`` binary in its own process group.

The deployment tests and ``make demo`` use it, so both see what a deployment sees: task
processes started by the executor through the Task SDK, Asset events, pools, mapping,
backfills. Login is SimpleAuthManager with real users and passwords (never all-admins).

This module never imports Airflow; it drives the CLI and the REST API.

    with AirflowStack(home, dags_folder=..., plugins_folder=..., extra_env={...}) as stack:
        stack.unpause("laion_snapshot_CC_MAIN_2000_01")
        run_id = stack.trigger("laion_snapshot_CC_MAIN_2000_01", {"wat_paths_uri": ...})
        assert stack.wait_run("laion_snapshot_CC_MAIN_2000_01", run_id, 600) == "success"

``python -m laion_tasks.airflow_local stop PIDFILE...`` stops the process groups listed in pid
files (``PGID NAME`` per line; the demo leaves its stack running and prints that command).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import httpx

FINISHED = frozenset({"success", "failed"})
SQLITE_CONNECT_ARGS = {"timeout": 60}
"""For a SQLite metadata DB (the demo): writers wait for the lock instead of failing after 5 s
(``airflow backfill create`` next to a busy scheduler). Airflow imports it by name."""
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def airflow_exe() -> str:
    """The ``airflow`` console script next to this interpreter (the venv's)."""
    return str(Path(sys.executable).parent / "airflow")


class StackError(RuntimeError):
    """A component failed; the message carries the tail of every component's log."""


class AirflowStack:
    """Airflow's components as subprocesses on loopback ports; a context manager."""

    def __init__(
        self,
        home: Path,
        *,
        dags_folder: Path,
        plugins_folder: Path | None = None,
        executor: Literal["LocalExecutor", "CeleryExecutor"] = "LocalExecutor",
        metadata_url: str | None = None,
        broker_url: str | None = None,
        extra_env: dict[str, str] | None = None,
        users: dict[str, str] | None = None,
        pools: dict[str, int] | None = None,
        parallelism: int = 4,
    ) -> None:
        if executor == "CeleryExecutor" and not broker_url:
            raise ValueError("CeleryExecutor needs a broker_url (e.g. redis://127.0.0.1:PORT/0)")
        self.home = Path(home).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs_dir = self.home / "component-logs"
        self.logs_dir.mkdir(exist_ok=True)
        self.executor = executor
        self.users = dict(users or {"laion": secrets.token_urlsafe(12)})
        self.pools = dict(pools if pools is not None else {"download": 4, "gpu": 1})
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.pidfile = self.home / "stack.pids"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._token: str | None = None
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps(self.users))
        passwords.chmod(0o600)
        env = dict(os.environ)
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins_folder or self.home / "plugins"),
                "AIRFLOW__CORE__EXECUTOR": executor,
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url or f"sqlite:///{self.home / 'airflow.db'}",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__API__BASE_URL": self.base_url,
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__WORKERS": "1",
                # every component signs or checks the task and UI tokens with the same key
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
                "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:admin" for u in self.users),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                # log servers: free ports, so several stacks (and engineers) can share a machine
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
                # a small deployment that reacts within seconds: parse once at start, then rarely
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "120",
                "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "600",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
                "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(parallelism),
                "NO_PROXY": "*",
                "no_proxy": "*",
            }
        )
        if metadata_url is None:
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = "laion_tasks.airflow_local.SQLITE_CONNECT_ARGS"
        if broker_url:
            env["AIRFLOW__CELERY__BROKER_URL"] = broker_url
        env.update(extra_env or {})
        self.env = env

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> AirflowStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 240.0) -> None:
        """Migrate the metadata DB, create the pools, start every component, wait until healthy."""
        self.cli("db", "migrate", timeout=600)
        if self.pools:  # one CLI start for all of them
            pools = self.home / "pools.json"
            pools.write_text(json.dumps({n: {"slots": k, "description": f"{n} slots"} for n, k in self.pools.items()}))
            self.cli("pools", "import", str(pools))
        self._spawn("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1")
        self._spawn("scheduler", "scheduler")
        self._spawn("dag-processor", "dag-processor")
        self._spawn("triggerer", "triggerer")
        if self.executor == "CeleryExecutor":
            # its own log-server port: the scheduler may serve logs on the shared one
            env = {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())}
            self._spawn("celery-worker", "celery", "worker", "--without-gossip", "--without-mingle", env=env)
        self.wait_healthy(timeout)

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        log = open(self.logs_dir / f"{name}.log", "ab")
        try:
            self.procs[name] = subprocess.Popen(
                [airflow_exe(), *args],
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends its children too
                cwd=self.home,
            )
        finally:
            log.close()
        with self.pidfile.open("a") as f:
            f.write(f"{self.procs[name].pid} {name}\n")

    def wait_healthy(self, timeout: float) -> None:
        """Until /api/v2/monitor/health says the database, scheduler, triggerer and dag-processor are healthy."""
        wanted = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                resp = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5, trust_env=False)
                if resp.status_code == 200:
                    last = resp.json()
                    if all((last.get(k) or {}).get("status") == "healthy" for k in wanted):
                        return
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(1)
        raise self.error(f"Airflow did not become healthy within {timeout:.0f}s (last health: {last})")

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise self.error(f"Airflow component(s) exited: {dead}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every process group started here, SIGKILL what is left after ``timeout``."""
        stop_groups([p.pid for p in self.procs.values()], timeout)  # exited leaders may leave children
        for proc in self.procs.values():
            try:
                proc.wait(1)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        self.pidfile.unlink(missing_ok=True)

    def error(self, message: str, lines: int = 40) -> StackError:
        """A StackError with the tail of each component's log."""
        parts = [message]
        for path in sorted(self.logs_dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return StackError("\n".join(parts))

    # -- CLI and REST ----------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``airflow ARGS`` against this deployment's metadata DB."""
        proc = subprocess.run(
            [airflow_exe(), *args], env=self.env, text=True, capture_output=True, timeout=timeout, cwd=self.home
        )
        if check and proc.returncode != 0:
            raise self.error(f"airflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def token(self, user: str | None = None) -> str:
        """A JWT from POST /auth/token with a user's password (the first user by default)."""
        if user is None and self._token:
            return self._token
        name = user or next(iter(self.users))
        resp = httpx.post(
            f"{self.base_url}/auth/token",
            json={"username": name, "password": self.users[name]},
            timeout=30,
            trust_env=False,
        )
        if resp.status_code not in (200, 201):
            raise self.error(f"login as {name} failed: {resp.status_code} {resp.text[:500]}")
        token = str(resp.json()["access_token"])
        if user is None:
            self._token = token
        return token

    def api(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """A call to the public REST API (``path`` under /api/v2); returns the decoded JSON."""
        resp = httpx.request(
            method,
            f"{self.base_url}/api/v2/{path.lstrip('/')}",
            json=json,
            params=params,
            headers={"Authorization": f"Bearer {self.token()}"},
            timeout=60,
            trust_env=False,
        )
        if resp.status_code >= 400:
            raise StackError(f"{method} {path}: {resp.status_code} {resp.text[:2000]}")
        return resp.json() if resp.content else None

    def wait_dag(self, dag_id: str, timeout: float = 180) -> dict[str, Any]:
        """Until the dag-processor has parsed ``dag_id``; import errors end the wait early."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                return dict(self.api("GET", f"dags/{dag_id}"))
            except StackError as exc:
                if " 404 " not in str(exc):
                    raise
            errors = self.api("GET", "importErrors").get("import_errors", [])
            if errors:
                raise self.error(f"DAG import errors: {json.dumps(errors, indent=1)[:6000]}")
            time.sleep(1)
        raise self.error(f"DAG {dag_id} was not parsed within {timeout:.0f}s")

    def unpause(self, dag_id: str) -> None:
        self.wait_dag(dag_id)
        self.api("PATCH", f"dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Start a run the way the UI's Trigger form does; returns its run_id."""
        self.wait_dag(dag_id)
        run = self.api("POST", f"dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        return str(run["dag_run_id"])

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return list(self.api("GET", f"dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "run_after"})["dag_runs"])

    def wait_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        """Until the run succeeds or fails; returns its state. Raises if it does neither in time."""
        deadline = time.monotonic() + timeout
        state = "missing"
        while time.monotonic() < deadline:
            self.check_alive()
            state = str(self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}")["state"])
            if state in FINISHED:
                return state
            time.sleep(2)
        raise self.error(f"run {dag_id}/{run_id} still {state} after {timeout:.0f}s; tasks: {self.task_states(dag_id, run_id)}")

    def wait_runs(self, dag_id: str, count: int = 1, timeout: float = 600) -> list[dict[str, Any]]:
        """Until ``dag_id`` has at least ``count`` runs and none is unfinished (runs this caller did
        not start: Asset-triggered, scheduled, backfills)."""
        deadline = time.monotonic() + timeout
        runs: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            self.check_alive()
            runs = self.runs(dag_id)
            if len(runs) >= count and all(r["state"] in FINISHED for r in runs):
                return runs
            time.sleep(2)
        raise self.error(f"{dag_id}: wanted {count} finished runs within {timeout:.0f}s, have {[(r['dag_run_id'], r['state']) for r in runs]}")

    def failure_report(self, dag_id: str, run_id: str, lines: int = 12) -> str:
        """The run's unsuccessful tasks, with the error lines of each failed task's log."""
        states = self.task_states(dag_id, run_id)
        parts = [f"{dag_id} {run_id}: " + ", ".join(f"{t}={s}" for t, s in states.items() if s != "success")]
        run_dir = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        for path in sorted(run_dir.rglob("*.log")) if run_dir.is_dir() else []:
            errors = [line for line in path.read_text(errors="replace").splitlines() if '"error"' in line or "Error" in line]
            if errors:
                parts.append(f"--- {path.relative_to(run_dir)} ---\n" + "\n".join(e[:3000] for e in errors[-lines:]))
        return "\n".join(parts)

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        """``task_id[map_index]`` -> state, for messages and checks."""
        items = self.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000})["task_instances"]
        return {f"{t['task_id']}[{t['map_index']}]" if t["map_index"] >= 0 else t["task_id"]: str(t["state"]) for t in items}


def stop_groups(pgids: list[int], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM each process group, wait up to ``timeout`` for all, then SIGKILL the rest."""
    live = []
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGTERM)
            live.append(pgid)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        live = [g for g in live if _group_alive(g)]
        time.sleep(0.2)
    for pgid in live:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _group_alive(pgid: int) -> bool:
    try:  # reap the leader if it is our own exited child: a zombie still answers signal 0
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "stop":
        raise SystemExit("usage: python -m laion_tasks.airflow_local stop PIDFILE [PIDFILE...]")
    pgids = []
    for pidfile in map(Path, args[1:]):
        if pidfile.exists():
            pgids += [int(line.split()[0]) for line in pidfile.read_text().splitlines() if line.strip()]
    stop_groups(pgids)
    for pidfile in map(Path, args[1:]):
        pidfile.unlink(missing_ok=True)
    print(f"stopped {len(pgids)} process group(s)")


if __name__ == "__main__":
    main()
