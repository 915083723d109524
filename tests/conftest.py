"""Shared fixtures: a private PostgreSQL server, a moto S3 server, and ../shared/data.

Servers listen on loopback ports chosen at random and are stopped at the end of the
session. In CI (``CI=true``) a missing PostgreSQL fails the run instead of skipping.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LAION_SHARED_DATA", REPO.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}: real-data tests need the shared corpus")
    return SHARED_DATA


def _pg_bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throwaway PostgreSQL cluster on a free loopback port with its own socket dir."""

    def __init__(self) -> None:
        bin_dir = _pg_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.bin = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="laion-pg-"))
        self.port = free_port()
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.sock.mkdir()
        self._run_as = self._unprivileged_user()
        if self._run_as:
            shutil.chown(self.base, self._run_as)
            shutil.chown(self.sock, self._run_as)

    @staticmethod
    def _unprivileged_user() -> str | None:
        # initdb refuses to run as root; use the postgres user Debian's package creates.
        if os.geteuid() != 0:
            return None
        return "postgres"

    def _cmd(self, *args: str) -> list[str]:
        if self._run_as:
            return ["runuser", "-u", self._run_as, "--", *args]
        return list(args)

    def start(self) -> None:
        subprocess.run(
            self._cmd(str(self.bin / "initdb"), "-A", "trust", "-U", "postgres", "-D", str(self.data)),
            check=True,
            capture_output=True,
        )
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.base / "log"), "-w", "start"),
            check=True,
            capture_output=True,
        )
        wait_for_port(self.port)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"),
            capture_output=True,
        )

    def restart(self) -> None:
        self.stop("immediate")
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.base / "log"), "-w", "start"),
            check=True,
            capture_output=True,
        )

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
        server.start()
    except Exception as exc:  # noqa: BLE001 - reported as skip or failure below
        if IN_CI:
            pytest.fail(f"CI needs PostgreSQL and it could not start: {exc}")
        pytest.skip(f"PostgreSQL not available: {exc}")
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def world_model():  # type: ignore[no-untyped-def]
    """The demo world's CLIP (laion_tasks/fixtures/world_model.py): trained once per generator + training digest,
    cached under $LAION_WORLD_DIR or ~/.cache/laion-tasks/world, so a session (and the demo) reuse it. When the
    session started its training in the background (below), this waits for it on the cache's file lock."""
    from laion_tasks.fixtures.world_model import ensure_world_model

    return ensure_world_model()


_world_training: subprocess.Popen[bytes] | None = None


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that score with the world model run last, and a missing model starts training now, in a
    background process, while the other tests run: training takes about 2.5 minutes of one core (its
    DataLoader worker decodes on the other), the costliest step of a clean ``make test`` otherwise. A
    failed background run costs nothing: the fixture then trains in-process under the same lock."""
    global _world_training
    needs = [item for item in items if "world_model" in getattr(item, "fixturenames", ())]
    if not needs:
        return
    others = [item for item in items if "world_model" not in getattr(item, "fixturenames", ())]
    items[:] = others + needs
    from laion_tasks.fixtures.world_model import WorldSpec, load_world_model, world_root

    if load_world_model(world_root() / WorldSpec().digest()) is not None or not others:
        return
    log = Path(tempfile.gettempdir()) / f"laion-world-training-{os.getpid()}.log"
    _world_training = subprocess.Popen(
        [sys.executable, "-m", "laion_tasks.fixtures.world_model"],
        cwd=Path(__file__).resolve().parent.parent, stdin=subprocess.DEVNULL,
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A background training still running when the session ends early (-x, Ctrl-C) is stopped."""
    if _world_training is not None and _world_training.poll() is None:
        _world_training.terminate()
        try:
            _world_training.wait(30)
        except subprocess.TimeoutExpired:
            _world_training.kill()


_db_counter = iter(range(10_000))


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    return postgres.create_database(f"lineage_{os.getpid()}_{next(_db_counter)}")


@pytest.fixture(params=["sqlite", "postgres"])
def lineage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same lineage tests run on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lineage.db'}"
    return request.getfixturevalue("postgres_url")


class MotoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3_root(moto_server: MotoServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh bucket on the moto server, with laion_tasks.storage pointed at it."""
    from laion_tasks import storage
    from laion_tasks.config import StorageConfig

    storage.configure(StorageConfig(s3_endpoint_url=moto_server.url, s3_max_attempts=2))
    bucket = f"test-{next(_db_counter)}-{os.getpid()}"
    storage.s3_client().create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/root"
    storage.configure(StorageConfig())
