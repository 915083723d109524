"""docker-compose.yaml validates (no engine needed) and names every promised service."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def test_compose_config_is_valid() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (make system-deps installs Debian's package)")
    proc = subprocess.run([exe, "-f", str(REPO / "docker-compose.yaml"), "config", "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_compose_has_the_deployment_services() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
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
