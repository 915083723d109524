"""CLIP training on a curated subset as a KubernetesPodOperator (one GPU node, torchrun over N GPUs).

The pod runs ``laion run train`` (the runner, on the train stage's declaration) on the same
storage URIs as the local demo; with ``train.gpus > 1`` and CUDA present,
``laion_tasks.stages.train`` launches ``torchrun --nproc_per_node=N`` itself. Settings travel
as ``LAION_*`` env vars built from that declaration (the ``train`` section whole plus its
result fields), so the pod computes the same skip key, and the pod records the run in
lineage (stage ``train``). As for the CLIP pod, credentials come from
the Secret ``train.k8s_env_secret`` and the run's ``storage_root`` / ``force`` Params reach
the pod: the subset and output paths are derived inside it from the rendered root.
"""

from __future__ import annotations

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

from laion_tasks.config import Settings


def train_pod_env(settings: Settings) -> dict[str, str]:
    from laion_common.gpu_pod import base_pod_env

    return base_pod_env(settings, "train")


def train_pod_resources(settings: Settings) -> k8s.V1ResourceRequirements:
    from laion_common.gpu_pod import gpu_resources

    cfg = settings.train
    return gpu_resources(cfg.k8s_cpu, cfg.k8s_memory, cfg.gpus)


def train_pod_operator(
    task_id: str,
    settings: Settings,
    snapshot: str,
    subset: str | None = None,
    **kwargs,
) -> KubernetesPodOperator:
    """A pod that trains ``settings.train.model`` on ``<root>/<snapshot>/subsets/<subset>``,
    writing to ``<root>/<snapshot>/models/<subset>`` (root: the run's ``storage_root`` Param,
    else the config's).

    ``kwargs`` go to the operator and win over the defaults built here (e.g. ``pool``,
    ``deferrable``).
    """
    from laion_common.gpu_pod import force_template, pod_env_vars

    cfg = settings.train
    arguments = ["run", "train", "--snapshot", snapshot, "--shard", subset or cfg.subset, force_template()]
    env, env_from = pod_env_vars(train_pod_env(settings), cfg.k8s_env_secret, "train")
    options = dict(
        task_id=task_id,
        image=cfg.k8s_image,
        namespace=cfg.k8s_namespace,
        cmds=["laion"],
        arguments=arguments,
        env_vars=env,
        env_from=env_from,
        container_resources=train_pod_resources(settings),
        node_selector=dict(cfg.k8s_node_selector),
        tolerations=[k8s.V1Toleration(**t) for t in cfg.k8s_tolerations],
        volumes=[
            k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=cfg.k8s_shm_size))
        ],
        volume_mounts=[k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
        labels={"app": "laion-tasks", "stage": "train"},
        get_logs=True,
        do_xcom_push=False,
        on_finish_action="delete_pod",
        startup_timeout_seconds=900,
    )
    options.update(kwargs)
    return KubernetesPodOperator(**options)
