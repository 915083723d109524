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
metrics and the result), :mod:`.run` (classifier, inference, report).
"""

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
