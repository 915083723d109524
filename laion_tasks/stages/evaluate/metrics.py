"""Zero-shot metrics exactly as CLIP_benchmark computes them, and the result they fill in.

* top-1 / top-5 with ``torch.topk`` (top-5 is reported only with >= 5 classes);
* mean per-class recall = sklearn's ``balanced_accuracy_score``: recall averaged over
  the classes present in the ground truth.

:class:`ZeroShotResult` also renders the report (JSON dict and Markdown), with the most
confused class pairs and the classes that absorb the most predictions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """Fraction of samples whose label is among the k highest logits (CLIP_benchmark's ``accuracy``)."""
    if len(target) == 0:
        return [float("nan") for _ in topk]
    pred = logits.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


def per_class_recall(target: np.ndarray, pred: np.ndarray) -> dict[int, tuple[int, float]]:
    """{class: (support, recall)} over the classes present in ``target``."""
    out: dict[int, tuple[int, float]] = {}
    for cls in np.unique(target):
        mask = target == cls
        out[int(cls)] = (int(mask.sum()), float((pred[mask] == cls).mean()))
    return out


def mean_per_class_recall(target: np.ndarray, pred: np.ndarray) -> float:
    """sklearn ``balanced_accuracy_score``: mean recall over the classes that occur in ``target``."""
    recalls = per_class_recall(target, pred)
    return float(np.mean([r for _, r in recalls.values()])) if recalls else float("nan")


def most_confused(target: np.ndarray, pred: np.ndarray, classnames: list[str], top: int) -> list[dict[str, Any]]:
    """The (true, predicted) pairs with the most errors, largest first (ties by class index)."""
    counts = Counter((int(t), int(p)) for t, p in zip(target, pred) if t != p)
    support = Counter(int(t) for t in target)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [
        {
            "true": classnames[t],
            "predicted": classnames[p],
            "true_index": t,
            "predicted_index": p,
            "count": n,
            "fraction_of_true": n / support[t],
        }
        for (t, p), n in ranked
    ]


@dataclass
class ZeroShotResult:
    dataset: str
    model: str
    weights: str | None
    classnames: list[str]
    n_templates: int
    keys: list[str]
    targets: np.ndarray
    logits: torch.Tensor
    """(n_images, n_classes) float32, 100 * cosine, in dataset order."""
    counts: Counter[str]
    errors: list[str]
    top_confusions_n: int = 20
    acc1: float = float("nan")
    acc5: float | None = None
    mean_per_class_recall: float = float("nan")
    per_class: dict[int, tuple[int, float]] = field(default_factory=dict)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(dim=1).numpy() if len(self.keys) else np.zeros(0, dtype=np.int64)

    def confusions(self, top: int | None = None) -> list[dict[str, Any]]:
        return most_confused(self.targets, self.predictions, self.classnames, top or self.top_confusions_n)

    def metrics(self) -> dict[str, Any]:
        return {"acc1": self.acc1, "acc5": self.acc5, "mean_per_class_recall": self.mean_per_class_recall}

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": "clip_benchmark zeroshot_classification",
            "dataset": self.dataset,
            "model": self.model,
            "weights": self.weights,
            "n_classes": len(self.classnames),
            "n_templates": self.n_templates,
            "n_images": len(self.keys),
            "metrics": self.metrics(),
            "counts": dict(self.counts),
            "errors": self.errors,
            "per_class": [
                {"index": c, "class": self.classnames[c], "support": s, "recall": r}
                for c, (s, r) in sorted(self.per_class.items())
            ],
            "most_confused": self.confusions(),
            "most_predicted": self.most_predicted(),
        }

    def most_predicted(self, top: int = 10) -> list[dict[str, Any]]:
        """Classes that absorb the most predictions: a collapsed (or untrained) model shows here first."""
        counts = Counter(int(p) for p in self.predictions)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        total = max(1, len(self.keys))
        return [{"class": self.classnames[c], "index": c, "count": n, "fraction": n / total} for c, n in ranked]

    def to_markdown(self) -> str:
        def pct(v: float | None) -> str:
            return "n/a" if v is None or v != v else f"{100 * v:.2f}%"

        lines = [
            f"# Zero-shot classification: {self.dataset}",
            "",
            f"Model `{self.model}` ({self.weights or 'random init'}), {len(self.classnames)} classes, "
            f"{self.n_templates} prompt templates, {len(self.keys)} images (CLIP_benchmark protocol).",
            "",
            "| metric | value |",
            "|---|---|",
            f"| top-1 accuracy | {pct(self.acc1)} |",
            f"| top-5 accuracy | {pct(self.acc5)} |",
            f"| mean per-class recall | {pct(self.mean_per_class_recall)} |",
            "",
            "| outcome | samples |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in sorted(self.counts.items())],
            "",
            "## Most confused class pairs",
            "",
        ]
        confusions = self.confusions()
        if confusions:
            lines += ["| true class | predicted as | images | share of true class |", "|---|---|---|---|"]
            lines += [
                f"| {c['true']} | {c['predicted']} | {c['count']} | {100 * c['fraction_of_true']:.1f}% |"
                for c in confusions
            ]
        else:
            lines.append("No misclassified images.")
        absorbing = self.most_predicted(5)
        if absorbing:
            lines += ["", "Most predicted classes: " + ", ".join(f"{c['class']} ({c['count']})" for c in absorbing) + "."]
        worst = sorted(self.per_class.items(), key=lambda kv: (kv[1][1], kv[0]))[:10]
        if worst:
            lines += ["", "## Lowest per-class recall", "", "| class | images | recall |", "|---|---|---|"]
            lines += [f"| {self.classnames[c]} | {s} | {pct(r)} |" for c, (s, r) in worst]
        if self.errors:
            lines += ["", "## Unusable samples", ""] + [f"- {e}" for e in self.errors]
        return "\n".join(lines) + "\n"
