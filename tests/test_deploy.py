"""docker-compose.yaml validates (no engine needed), names every promised service, and ships no secret."""

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yaml"
SECRET_VARS = ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "AIRFLOW_JWT_SECRET")
# Values this file once shipped, and the usual suspects.
KNOWN_DEFAULTS = ("change-me", "laion-secret", "laion:laion@", "minioadmin", "admin:admin@", "password: laion")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY", re.I)
INTERPOLATION = re.compile(r"(?<!\$)\$\{(\w+)(:?[-?+])?([^}]*)\}")  # $${X} is the container shell's


def _strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def _compose_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS and k != "LAION_BIND_ADDRESS"}
    return {**env, **extra}


def test_compose_config_is_valid_only_with_every_secret_set(tmp_path: Path) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (make system-deps installs Debian's package)")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    cmd = [exe, "-f", str(COMPOSE), "--env-file", str(empty), "config"]
    values = {name: f"test-{name.lower()}" for name in SECRET_VARS}
    ok = subprocess.run(cmd, capture_output=True, text=True, env=_compose_env(values), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    rendered = yaml.safe_load(ok.stdout)
    for service in rendered["services"].values():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", port
    for name in SECRET_VARS:
        missing = subprocess.run(
            cmd + ["-q"], capture_output=True, text=True, env=_compose_env({k: v for k, v in values.items() if k != name}), cwd=tmp_path
        )
        assert missing.returncode != 0 and name in missing.stderr and ".env" in missing.stderr, missing.stderr


def test_compose_has_no_default_secret() -> None:
    text = COMPOSE.read_text()
    for known in KNOWN_DEFAULTS:
        assert known not in text.lower(), f"docker-compose.yaml contains {known!r}"
    compose = yaml.safe_load(text)
    for where, value in _strings(compose):
        for name, op, rest in INTERPOLATION.findall(value):
            if name in SECRET_VARS or SECRET_NAME.search(name):
                assert op == ":?" and rest.strip(), f"{where}: ${{{name}}} must be required (:?message), not {op or 'bare'}"
        key = where.rsplit(".", 1)[-1]
        if SECRET_NAME.search(key):
            assert INTERPOLATION.fullmatch(value.strip()), f"{where} is a literal secret"
        for url_password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
            assert INTERPOLATION.fullmatch(url_password), f"{where} has a literal password in a URL"
    example = (REPO / ".env.example").read_text()
    for name in SECRET_VARS:
        assert re.search(rf"^{name}=$", example, re.M), f".env.example must list {name} with no value"
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_published_ports_bind_loopback_by_default() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    ports = [(name, p) for name, svc in compose["services"].items() for p in svc.get("ports", [])]
    assert ports
    for name, port in ports:
        assert str(port).startswith("${LAION_BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port} binds all interfaces"


def test_compose_has_the_deployment_services() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = set(compose["services"])
    assert {
        "postgres",
        "minio",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
    } <= services
    assert compose["services"]["airflow-scheduler"]["build"] == "."
    assert "LAION_LINEAGE__URL" in compose["services"]["airflow-worker"]["environment"]
