"""CLIP training on a curated subset as a KubernetesPodOperator (one GPU node, torchrun over N GPUs).

The pod runs ``laion run train`` (the runner, on the train stage's declaration) on the same
storage URIs as the local demo; with ``train.gpus > 1`` and CUDA present,
``laion_tasks.stages.train`` launches ``torchrun --nproc_per_node=N`` itself. Settings travel
as ``LAION_*`` env vars built from that declaration (the ``train`` section whole plus its
result fields), so the pod computes the same skip key, and the pod records the run in
lineage (stage ``train``). As for the CLIP pod, credentials come from
the Secret ``pods.train.env_secret`` and the run's ``storage_root`` / ``force`` Params reach
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
    from laion_common.gpu_pod import pod_options

    return pod_options("train", settings, "train", gpus=settings.train.gpus)["container_resources"]


def train_pod_operator(
    task_id: str,
    settings: Settings,
    snapshot: str,
    subset: str | None = None,
    **kwargs,
) -> KubernetesPodOperator:
    """A pod that trains ``settings.train.model`` on ``<root>/<snapshot>/subsets/<subset>``,
    writing to ``<root>/<snapshot>/models/<subset>`` (root: the run's ``storage_root`` Param,
    else the config's). One GPU per torchrun worker: ``max(pods.train.gpus, train.gpus)``.

    ``kwargs`` go to the operator and win over the defaults built here (e.g. ``pool``,
    ``deferrable``).
    """
    from laion_common.gpu_pod import force_template, pod_options

    options = pod_options(task_id, settings, "train", gpus=settings.train.gpus)
    options["arguments"] = ["run", "train", "--snapshot", snapshot, "--shard", subset or settings.train.subset,
                            force_template()]
    options.update(kwargs)
    return KubernetesPodOperator(**options)
