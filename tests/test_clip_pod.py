"""The GPU pod spec for the CLIP stage, rendered without a cluster (``build_pod_request_obj(dry_run=True)``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from laion_tasks.config import load_settings

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "pg-s3cr3t-value"


def assert_no_secret_in_env(pod, secret_name: str) -> None:  # type: ignore[no-untyped-def]
    """Credentials come only by reference to the Secret: no value in env, nothing in the serialised pod."""
    from kubernetes.client import ApiClient

    (container,) = pod.spec.containers
    by_name = {e.name: e for e in container.env}
    lineage = by_name["LAION_LINEAGE__URL"]
    assert lineage.value is None
    assert (lineage.value_from.secret_key_ref.name, lineage.value_from.secret_key_ref.key) == (secret_name, "LAION_LINEAGE__URL")
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(by_name)
    assert [e.secret_ref.name for e in container.env_from] == [secret_name]
    raw = json.dumps(ApiClient().sanitize_for_serialization(pod))
    assert PASSWORD not in raw and "postgresql" not in raw


@pytest.fixture(scope="module")
def gpu_pod(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow-home")))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    if str(REPO / "dags") not in sys.path:
        sys.path.insert(0, str(REPO / "dags"))
    from laion_common import gpu_pod

    return gpu_pod


def deployment_settings():  # type: ignore[no-untyped-def]
    return load_settings(
        environ={},
        overrides={
            "storage": {"root": "s3://laion-bucket/runs", "s3_endpoint_url": "http://minio.data:9000"},
            "lineage": {"url": f"postgresql+psycopg2://laion:{PASSWORD}@pg.data:5432/lineage"},
            "clip": {
                "execution": "kubernetes",
                "batch_size": 1024,
                "num_workers": 12,
                "english": {"model": "ViT-B-32", "pretrained": None, "checkpoint": "s3://w/vitb32.pt", "threshold": 0.3},
            },
            "langid": {"threshold": 0.6},
            "pods": {"clip": {
                "image": "registry.example/laion-tasks:1.2.3",
                "namespace": "laion",
                "node_selector": {"gpu-type": "h100"},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
                "gpus": 2,
                "cpu": "16",
                "memory": "64Gi",
                "env_secret": "laion-credentials",
                "pool": "h100-pool",
            }},
        },
    )


def test_pod_spec_renders_without_a_cluster(gpu_pod) -> None:  # type: ignore[no-untyped-def]
    settings = deployment_settings()
    op = gpu_pod.clip_pod_operator("clip_batch", settings, "CC-MAIN-2024-10", ["000001", "000002"])
    assert PASSWORD not in json.dumps([str(e) for e in op.env_vars])  # nothing for the UI to show
    op.render_template_fields({"params": {}})
    assert op.pool == "h100-pool"
    assert op.deferrable is True
    assert op.do_xcom_push is False
    pod = op.build_pod_request_obj(dry_run=True)
    spec = pod.spec
    assert pod.metadata.namespace == "laion"
    assert pod.metadata.labels["stage"] == "clip"
    assert spec.node_selector == {"gpu-type": "h100"}
    assert [(t.key, t.operator, t.value, t.effect) for t in spec.tolerations] == [("dedicated", "Equal", "gpu", "NoSchedule")]
    assert spec.restart_policy == "Never"
    (container,) = spec.containers
    assert container.image == "registry.example/laion-tasks:1.2.3"
    assert container.command == ["laion"]
    assert container.args == ["run", "clip", "--snapshot", "CC-MAIN-2024-10", "--shard", "000001,000002", "--no-force"]
    res = container.resources
    assert res.requests == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2"}
    assert res.limits == {"memory": "64Gi", "nvidia.com/gpu": "2"}
    env = {e.name: e.value for e in container.env}
    assert env["LAION_STORAGE__ROOT"] == "s3://laion-bucket/runs"
    assert env["LAION_STORAGE__S3_ENDPOINT_URL"] == "http://minio.data:9000"
    assert json.loads(env["LAION_CLIP"])["english"]["checkpoint"] == "s3://w/vitb32.pt"
    assert_no_secret_in_env(pod, "laion-credentials")
    assert [(m.name, m.mount_path) for m in container.volume_mounts] == [("dshm", "/dev/shm")]
    assert spec.volumes[0].empty_dir.medium == "Memory"
    # The serialised pod is valid Kubernetes JSON with the GPU request in it.
    from kubernetes.client import ApiClient

    raw = ApiClient().sanitize_for_serialization(pod)
    assert raw["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_pod_env_rebuilds_the_same_clip_settings_and_digest(gpu_pod) -> None:  # type: ignore[no-untyped-def]
    """What the pod loads from its env equals the scheduler's settings, so lineage digests match."""
    from laion_tasks.stages.clip import SPEC

    settings = deployment_settings()
    env = {k: v.replace(gpu_pod.storage_root_template(settings), settings.storage.root) for k, v in gpu_pod.pod_env(settings).items()}
    env["LAION_LINEAGE__URL"] = settings.lineage.url  # what the Secret holds
    inside = load_settings(environ=env)
    assert inside.clip == settings.clip
    assert SPEC.config_digest(inside, "000001") == SPEC.config_digest(settings, "000001")
    assert SPEC.knobs(inside, "000001") == SPEC.knobs(settings, "000001")
    assert inside.storage.root == settings.storage.root
    assert inside.storage.s3_endpoint_url == settings.storage.s3_endpoint_url
    assert inside.lineage.url == settings.lineage.url
    assert inside.langid.threshold == 0.6


def test_templated_shard_ids_and_overrides(gpu_pod) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings(environ={})
    template = "{{ params.shards }}"
    op = gpu_pod.clip_pod_operator(
        "clip_templated", settings, "CC-MAIN-2024-10", template, deferrable=False, image_pull_policy="Always"
    )
    assert op.arguments[-2] == template
    assert "arguments" in op.template_fields
    op.render_template_fields({"params": {"shards": "000007,000008"}})
    assert op.arguments == ["run", "clip", "--snapshot", "CC-MAIN-2024-10", "--shard", "000007,000008", "--no-force"]
    pod = op.build_pod_request_obj(dry_run=True)
    (container,) = pod.spec.containers
    assert container.args[-2] == "000007,000008"
    rendered_env = {e.name: e.value for e in container.env if e.value is not None}
    assert load_settings(environ=rendered_env).clip == settings.clip  # rendering leaves the JSON config intact
    assert container.image_pull_policy == "Always"
    assert op.deferrable is False
    # Defaults from config: one GPU, NVIDIA toleration and node selector, the "gpu" pool.
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu"
    assert op.pool == "gpu"
    assert [e.secret_ref.name for e in container.env_from] == ["laion-credentials"]  # the default Secret


def test_pod_honours_the_runs_params(gpu_pod) -> None:  # type: ignore[no-untyped-def]
    """storage_root and force, as triggered, reach the pod as they reach the CPU tasks."""
    settings = deployment_settings()
    op = gpu_pod.clip_pod_operator("clip_batch", settings, "CC-MAIN-2024-10", ["000001"])
    op.render_template_fields({"params": {"storage_root": "s3://other-bucket/rerun", "force": True}})
    pod = op.build_pod_request_obj(dry_run=True)
    (container,) = pod.spec.containers
    env = {e.name: e.value for e in container.env}
    assert env["LAION_STORAGE__ROOT"] == "s3://other-bucket/rerun"
    assert container.args[-1] == "--force"
    assert_no_secret_in_env(pod, "laion-credentials")
    inside = load_settings(environ={k: v for k, v in env.items() if v is not None})
    assert inside.storage.root == "s3://other-bucket/rerun" and inside.clip == settings.clip
    # The mapped pods' arguments are built by a task at run time from the same Params.
    assert gpu_pod.clip_pod_arguments("S", "000001", gpu_pod.force_flag({"force": True}))[-1] == "--force"
    assert gpu_pod.clip_pod_arguments("S", "000001", gpu_pod.force_flag({}))[-1] == "--no-force"


def test_pod_without_a_secret_is_refused(gpu_pod) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings(environ={}, overrides={"pods": {"clip": {"env_secret": None}}})
    with pytest.raises(ValueError, match="pods.clip.env_secret"):
        gpu_pod.clip_pod_operator("clip_batch", settings, "CC-MAIN-2024-10", ["000001"])


def test_clip_digest_follows_language_routing() -> None:
    """A changed language threshold re-routes pairs between models, so CLIP must re-run, as must a
    device or precision (they change the embeddings); a batch size, a pod resource or a threshold
    (applied in curate) re-runs nothing."""
    from laion_tasks.config import Settings
    from laion_tasks.stages.clip import SPEC

    def digest(data: dict) -> str:  # type: ignore[type-arg]
        return SPEC.config_digest(Settings.model_validate(data), "000000")

    base = digest({})
    assert digest({"langid": {"threshold": 0.7}}) != base
    assert digest({"clip": {"english": {"model": "ViT-L-14"}}}) != base
    assert digest({"clip": {"device": "cuda"}}) != base and digest({"clip": {"precision": "fp32"}}) != base
    for same in ({"tag": {"nudenet": True}}, {"clip": {"batch_size": 8, "num_workers": 2}}, {"pods": {"clip": {"memory": "1Gi"}}},
                 {"clip": {"english": {"threshold": 0.3}}}):
        assert digest(same) == base, same
