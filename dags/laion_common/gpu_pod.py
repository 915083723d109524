"""GPU stages as KubernetesPodOperators: one pod builder for every stage with a ``pods.<stage>`` section
(the CLIP stage here, training in ``train_pod``).

The pod runs the same runner (``laion run clip``) on the same storage URIs as the
in-process path, and records lineage itself. Its configuration comes from the clip
stage's declaration (``laion_tasks.runner.stage_env``): the ``clip`` section whole plus
every result field outside it (the language-ID knobs), so the pod computes the same skip
key as the scheduler. XCom carries nothing but batch ranges. (Building that env imports
the stage's module, torch included: only DAG files in ``kubernetes`` mode do.)

Credentials never go into ``env_vars`` (a templated field the UI shows): the lineage URL
(``LAION_LINEAGE__URL``, required, by ``secretKeyRef``) and the S3 keys (by ``envFrom``)
come from the Kubernetes Secret named by ``pods.<stage>.env_secret``. The run's Params reach the pod
as they reach the CPU tasks: ``storage_root`` through a template rendered per run, ``force``
through the pod's arguments.
"""

from __future__ import annotations

import json
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

from laion_tasks.config import Settings


LINEAGE_SECRET_KEY = "LAION_LINEAGE__URL"
"""The key of the pod Secret that holds the lineage URL (with its password)."""


def storage_root_template(settings: Settings) -> str:
    """The run's ``storage_root`` Param, else the configured root: rendered per run, as the CPU tasks read it."""
    return "{{ params.get('storage_root') or %s }}" % json.dumps(settings.storage.root)


def force_template() -> str:
    """``--force`` when the run's ``force`` Param is set (``--no-force`` keeps the argument list fixed)."""
    return "{{ '--force' if params.get('force') else '--no-force' }}"


def force_flag(params: dict) -> str:  # type: ignore[type-arg]
    """The same choice at run time, for argument lists built by a task."""
    return "--force" if params.get("force") else "--no-force"


def base_pod_env(settings: Settings, stage: str) -> dict[str, str]:
    """LAION_* variables that rebuild, inside a pod, the storage settings and everything one
    stage's result depends on, from its declaration (its section whole, as one JSON value
    parsed by load_settings, plus its result fields outside it), so no knob can be forgotten
    and the pod computes the same skip key as the scheduler. No credentials: see :func:`secret_env`."""
    from laion_tasks import runner

    env = {
        "LAION_STORAGE__ROOT": storage_root_template(settings),
        "LAION_STORAGE__S3_REGION": settings.storage.s3_region,
        "PYTHONUNBUFFERED": "1",
    }
    env.update(runner.stage_env(settings, runner.spec(stage)))
    if settings.storage.s3_endpoint_url:
        env["LAION_STORAGE__S3_ENDPOINT_URL"] = settings.storage.s3_endpoint_url
    return env


def pod_env(settings: Settings) -> dict[str, str]:
    """The CLIP pod's settings, from the clip stage's declaration."""
    return base_pod_env(settings, "clip")


def secret_env(secret: str | None, owner: str) -> tuple[list[k8s.V1EnvVar], list[k8s.V1EnvFromSource]]:
    """(env, env_from) taking the pod's credentials from Secret ``secret``: the lineage URL by
    ``secretKeyRef`` (the pod does not start without it), every other key (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, ...) by ``envFrom``. Only the Secret's name is in the spec."""
    if not secret:
        raise ValueError(
            f"pods.{owner}.env_secret is not set: a pod takes its lineage URL ({LINEAGE_SECRET_KEY}) and S3 keys "
            "from a Kubernetes Secret, never from the DAG's env"
        )
    ref = k8s.V1SecretKeySelector(name=secret, key=LINEAGE_SECRET_KEY)
    env = [k8s.V1EnvVar(name=LINEAGE_SECRET_KEY, value_from=k8s.V1EnvVarSource(secret_key_ref=ref))]
    return env, [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret))]


def pod_env_vars(plain: dict[str, str], secret: str | None, owner: str) -> tuple[list[k8s.V1EnvVar], list[k8s.V1EnvFromSource]]:
    """The pod's env: the plain (templated, non-secret) values, then the Secret references."""
    refs, env_from = secret_env(secret, owner)
    return [k8s.V1EnvVar(name=k, value=v) for k, v in plain.items()] + refs, env_from


def gpu_resources(cpu: str, memory: str, gpus: int) -> k8s.V1ResourceRequirements:
    """GPUs must be requested and limited equally; CPU is only requested, so decode workers may burst."""
    return k8s.V1ResourceRequirements(
        requests={"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(gpus)},
        limits={"memory": memory, "nvidia.com/gpu": str(gpus)},
    )


def pod_options(task_id: str, settings: Settings, stage: str, gpus: int | None = None) -> dict[str, Any]:
    """Everything about a stage's pod except its arguments, from ``pods.<stage>``: the one pod builder."""
    cfg = getattr(settings.pods, stage)
    env, env_from = pod_env_vars(base_pod_env(settings, stage), cfg.env_secret, stage)
    return dict(
        task_id=task_id,
        image=cfg.image,
        namespace=cfg.namespace,
        cmds=["laion"],
        env_vars=env,
        env_from=env_from,
        container_resources=gpu_resources(cfg.cpu, cfg.memory, max(cfg.gpus, gpus or 0)),
        node_selector=dict(cfg.node_selector),
        tolerations=[k8s.V1Toleration(**t) for t in cfg.tolerations],
        volumes=[k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=cfg.shm_size))],
        volume_mounts=[k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
        labels={"app": "laion-tasks", "stage": stage},
        deferrable=cfg.deferrable,
        pool=cfg.pool,
        get_logs=True,
        do_xcom_push=False,
        on_finish_action="delete_pod",
        startup_timeout_seconds=cfg.startup_timeout_s,
    )


def clip_pod_resources(settings: Settings) -> k8s.V1ResourceRequirements:
    return pod_options("clip", settings, "clip")["container_resources"]


def clip_pod_operator(
    task_id: str,
    settings: Settings,
    snapshot: str,
    shard_ids: list[str] | str,
    **kwargs,
) -> KubernetesPodOperator:
    """A pod that CLIP-scores ``shard_ids`` of ``snapshot`` on one GPU node.

    ``shard_ids`` is a list, or a string that may be a Jinja template rendering to
    comma-separated ids (e.g. from a mapped batch). ``kwargs`` go to the operator and win
    over the defaults built here.
    """
    shards = shard_ids if isinstance(shard_ids, str) else ",".join(shard_ids)
    options = clip_pod_options(task_id, settings)
    options["arguments"] = clip_pod_arguments(snapshot, {"shards": shards})
    options.update(kwargs)
    return KubernetesPodOperator(**options)


def clip_pod_arguments(snapshot: str, batch: dict[str, Any], force: str | None = None) -> list[str]:
    """``laion run clip`` on one batch: a range of the download plan, or ``{"shards": "a,b"}`` (may be a template).

    ``force``: ``--force`` / ``--no-force`` (default: a template of the run's ``force`` Param).
    """
    if "shards" in batch:
        chosen = ["--shard", batch["shards"] if isinstance(batch["shards"], str) else ",".join(batch["shards"])]
    else:
        chosen = ["--batch", json.dumps(batch, sort_keys=True)]
    return ["run", "clip", "--snapshot", snapshot, *chosen, force or force_template()]


def clip_pod_partial(task_id: str, settings: Settings, **kwargs):  # type: ignore[no-untyped-def]
    """A mapped version: ``.expand(arguments=[clip_pod_arguments(...), ...])``, one pod per batch."""
    options = clip_pod_options(task_id, settings)
    options.update(kwargs)
    return KubernetesPodOperator.partial(**options)


def clip_pod_options(task_id: str, settings: Settings) -> dict:
    """Everything about the CLIP pod except its arguments (which shards)."""
    return pod_options(task_id, settings, "clip")
