"""Zero-shot classification evaluation with CLIP_benchmark's protocol.

Why this protocol, exactly: users compare numbers with published CLIP_benchmark /
OpenCLIP tables, so the classifier and the metrics follow
``clip_benchmark.metrics.zeroshot_classification`` step for step:

* class embedding = mean of the L2-normalised embeddings of one class's prompts,
  renormalised (one text batch per class, as CLIP_benchmark does, so the floating
  point sums are the same);
* logits = 100 * normalised image embedding @ classifier; prediction = argmax;
* top-1 / top-5 with ``torch.topk`` (top-5 is reported only with >= 5 classes);
* mean per-class recall = sklearn's ``balanced_accuracy_score``: recall averaged over
  the classes present in the ground truth.

Datasets (:func:`open_dataset` picks by layout): an ImageFolder-style directory, the
flat ``labels.tsv`` layout (``filename``, ``class_index``), or WebDataset shards whose
samples carry a ``.cls`` label. Every input sample ends in one outcome: ``success`` or
``bad:<reason>`` (undecodable image, missing or out-of-range label).

Split by role: :mod:`.datasets` (readers, class names, templates), :mod:`.metrics` (the
metrics and the result), :mod:`.run` (classifier, inference, report). The stage's
declaration (:data:`SPEC`) ends this module.
"""

import json
from typing import Any

from laion_tasks import layout, storage
from laion_tasks.stage import Context, ShardStats, StageSpec

from laion_tasks.stages.evaluate.datasets import (
    CLASSNAMES_FILE,
    IMAGE_EXTENSIONS,
    TEMPLATES_FILE,
    WDS_IMAGE_KEYS,
    WDS_LABEL_KEYS,
    ZEROSHOT_DATA_DIR,
    LabeledImage,
    LabeledImageSet,
    class_prompts,
    default_classnames,
    default_templates,
    load_classnames,
    load_image_folder,
    load_labels_tsv,
    load_templates,
    load_webdataset,
    open_dataset,
    resolve_class_setup,
)
from laion_tasks.stages.evaluate.metrics import (
    ZeroShotResult,
    mean_per_class_recall,
    most_confused,
    per_class_recall,
    topk_accuracy,
)
from laion_tasks.stages.evaluate.run import (
    MAX_LISTED_ERRORS,
    build_classifier,
    evaluate_zeroshot,
    write_report,
    zeroshot_eval,
)

__all__ = [
    "SPEC",
    "CLASSNAMES_FILE",
    "IMAGE_EXTENSIONS",
    "LabeledImage",
    "LabeledImageSet",
    "MAX_LISTED_ERRORS",
    "TEMPLATES_FILE",
    "WDS_IMAGE_KEYS",
    "WDS_LABEL_KEYS",
    "ZEROSHOT_DATA_DIR",
    "ZeroShotResult",
    "build_classifier",
    "class_prompts",
    "default_classnames",
    "default_templates",
    "evaluate_zeroshot",
    "load_classnames",
    "load_image_folder",
    "load_labels_tsv",
    "load_templates",
    "load_webdataset",
    "mean_per_class_recall",
    "most_confused",
    "open_dataset",
    "per_class_recall",
    "resolve_class_setup",
    "topk_accuracy",
    "write_report",
    "zeroshot_eval",
]


# -- the stage's declaration ---------------------------------------------------------


def eval_dir(ctx: Context, subset: str) -> str:
    return layout.eval_dir(ctx.root, ctx.snapshot, subset)


def _run_eval(ctx: Context, subset: str) -> ShardStats:
    from laion_tasks.models.clip import load_clip

    cfg = ctx.settings.eval
    checkpoint = layout.checkpoint_uri(layout.model_dir(ctx.root, ctx.snapshot, subset))
    with storage.local_copy(checkpoint) as path:
        model = load_clip(ctx.settings.train.model, checkpoint=str(path), device=cfg.device)
    return evaluate_zeroshot(model, cfg.dataset or "", eval_dir(ctx, subset), cfg, cfg.classnames, cfg.templates)


def _trained(ctx: Context) -> list[str]:
    from laion_tasks.stages.train import trained_subsets

    return trained_subsets(ctx.settings.train)


def _eval_report(ctx: Context, shards: dict[str, Any]) -> dict[str, Any]:
    """``train.subset``'s metrics and report, and under ``subsets`` those of every trained subset."""
    from laion_tasks.stages.train import trained_subsets

    if not ctx.settings.eval.dataset:
        return {"skipped": "eval.dataset is not set"}
    per_subset: dict[str, Any] = {}
    for subset in trained_subsets(ctx.settings.train):
        out = eval_dir(ctx, subset)
        summary = storage.join(out, "zeroshot.json")
        metrics = json.loads(storage.read_text(summary)).get("metrics", {}) if storage.exists(summary) else {}
        per_subset[subset] = {"report": storage.join(out, "zeroshot.md"), "metrics": metrics}
    return {"subset": ctx.settings.train.subset, **per_subset[ctx.settings.train.subset], "subsets": per_subset}


SPEC = StageSpec(
    name="eval",
    downstream=True,
    reads=("train",),  # the checkpoint trained on the subset of the same name
    # the device and precision (amp or fp32) change the scores; batch_size and decode_threads do not
    result_fields=("eval.dataset", "eval.templates", "eval.classnames", "eval.top_confusions", "train.model",
                   "eval.device", "eval.precision"),
    output=lambda ctx, subset: storage.join(eval_dir(ctx, subset), "zeroshot.json"),
    run_shard=_run_eval,
    shards=lambda ctx: _trained(ctx) if ctx.settings.eval.dataset else [],
    plan_name="subsets",
    input_uri=lambda ctx, subset: layout.model_dir(ctx.root, ctx.snapshot, subset),
    section="eval",
    after_batch=_eval_report,
)
