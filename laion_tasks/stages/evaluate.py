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
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import io
import json
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from laion_tasks import storage
from laion_tasks.config import EvalConfig
from laion_tasks.models.clip import LoadedClip
from laion_tasks.stage import ShardStats, StageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""torchvision's ImageFolder extensions."""
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
WDS_LABEL_KEYS = ("cls", "cls2", "label")
ZEROSHOT_DATA_DIR = Path(__file__).resolve().parent.parent / "zeroshot_data"
CLASSNAMES_FILE = "en_classnames.json"
TEMPLATES_FILE = "en_zeroshot_classification_templates.json"
MAX_LISTED_ERRORS = 50


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class LabeledImage:
    """One evaluation sample: encoded image bytes (or a path to read them from) and its class index."""

    key: str
    label: int | None
    path: str | None = None
    data: bytes | None = None
    label_error: str | None = None
    """Why ``label`` is None (e.g. an unparsable .cls), for the bad:<reason> outcome."""

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            raise ValueError(f"sample {self.key} has neither bytes nor a path")
        return storage.read_bytes(self.path)


@dataclass
class LabeledImageSet:
    """A re-iterable labelled image collection; ``classnames`` is what the layout itself names."""

    name: str
    source: str
    layout: str
    iter_samples: Callable[[], Iterator[LabeledImage]]
    classnames: list[str] | None = None
    size: int | None = None

    def __iter__(self) -> Iterator[LabeledImage]:
        return self.iter_samples()


def _humanise(dirname: str) -> str:
    return dirname.replace("_", " ").strip()


def load_image_folder(root: str | Path) -> LabeledImageSet:
    """torchvision ImageFolder semantics: sorted class directories, sorted files below each (recursively).

    Class names default to the directory names with underscores turned into spaces.
    """
    base = Path(root)
    if not base.is_dir():
        raise StageError(f"{base}: not a directory")
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise StageError(f"{base}: no class sub-directories (ImageFolder layout expected)")
    items: list[tuple[str, int]] = []
    for index, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((str(path), index))

    def iterate() -> Iterator[LabeledImage]:
        for path, label in items:
            yield LabeledImage(key=str(Path(path).relative_to(base)), label=label, path=path)

    return LabeledImageSet(
        name=base.name,
        source=str(base),
        layout="imagefolder",
        iter_samples=iterate,
        classnames=[_humanise(p.name) for p in class_dirs],
        size=len(items),
    )


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


_NAME_COLUMNS = ("clip_benchmark_classname", "classname", "class_name", "filename_label", "name")


def _name_column(rows: list[dict[str, str]]) -> str | None:
    if not rows:
        return None
    return next((c for c in _NAME_COLUMNS if c in rows[0]), None)


def load_labels_tsv(root: str | Path, labels_file: str = "labels.tsv") -> LabeledImageSet:
    """The flat layout: images in one directory plus ``labels.tsv`` (``filename``, ``class_index``).

    When a ``*classes.tsv`` beside it lists every class (``class_index`` + a name column), the
    labels index into that full list (e.g. all 1000 ImageNet classes for a 200-image sample);
    otherwise the classes are the distinct labels present, renumbered 0..K-1 in index order.
    """
    base = Path(root)
    labels_path = base / labels_file
    if not labels_path.is_file():
        raise StageError(f"{labels_path}: missing (flat layout needs filename + class_index columns)")
    rows = _read_tsv(labels_path)
    if rows and not {"filename", "class_index"} <= set(rows[0]):
        raise StageError(f"{labels_path}: needs columns filename and class_index, has {sorted(rows[0])}")
    classnames: list[str] | None = None
    remap: dict[int, int] | None = None
    class_files = sorted(p for p in base.glob("*classes.tsv") if p.name != labels_file)
    for class_file in class_files:
        class_rows = _read_tsv(class_file)
        column = _name_column(class_rows)
        if class_rows and "class_index" in class_rows[0] and column:
            by_index = {int(r["class_index"]): r[column] for r in class_rows}
            if sorted(by_index) == list(range(len(by_index))):
                classnames = [by_index[i] for i in range(len(by_index))]
                break
    if classnames is None:
        column = _name_column(rows)
        valid = [r for r in rows if (r.get("class_index") or "").strip().isdigit()]
        present = sorted({int(r["class_index"]) for r in valid})
        remap = {old: new for new, old in enumerate(present)}
        names = {int(r["class_index"]): r[column] for r in valid} if column else {}
        classnames = [names.get(old, str(old)) for old in present]

    def iterate() -> Iterator[LabeledImage]:
        for row in rows:
            raw = (row.get("class_index") or "").strip()
            label: int | None
            error = None
            try:
                label = int(raw)
                if remap is not None:
                    label = remap[label]
            except (ValueError, KeyError):
                label, error = None, "unparsable_label"
            yield LabeledImage(key=row["filename"], label=label, path=str(base / row["filename"]), label_error=error)

    return LabeledImageSet(
        name=base.name,
        source=str(base),
        layout="labels_tsv",
        iter_samples=iterate,
        classnames=classnames,
        size=len(rows),
    )


def _wds_classnames(shards: Sequence[str]) -> list[str] | None:
    """CLIP_benchmark's wds convention: ``classnames.txt`` (one per line) next to the shards."""
    if not shards:
        return None
    parent = shards[0].rsplit("/", 1)[0] if "/" in shards[0] else "."
    for candidate in (storage.join(parent, "classnames.txt"), storage.join(parent, "..", "classnames.txt")):
        with contextlib.suppress(Exception):
            if storage.exists(candidate):
                return [line.strip() for line in storage.read_text(candidate).splitlines() if line.strip()]
    return None


def load_webdataset(shards: Sequence[str], name: str | None = None) -> LabeledImageSet:
    """WebDataset tar shards (local or s3://) whose samples hold an image and a ``.cls`` label.

    Samples are grouped with webdataset's own tar iterators; a sample without an image
    or label becomes a ``bad:`` outcome instead of being skipped silently.
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    shard_list = list(shards)
    if not shard_list:
        raise StageError("no WebDataset shards given")

    def iterate() -> Iterator[LabeledImage]:
        for shard in shard_list:
            try:
                with storage.open_read(shard) as raw:
                    for sample in group_by_keys({**f, "__url__": shard} for f in tar_file_iterator(raw)):
                        key = f"{shard.rsplit('/', 1)[-1]}/{sample['__key__']}"
                        image_key = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
                        label_key = next((k for k in WDS_LABEL_KEYS if k in sample), None)
                        label: int | None = None
                        error = None
                        if label_key is None:
                            error = "missing_label"
                        else:
                            try:
                                label = int(sample[label_key].decode("utf-8").strip())
                            except (ValueError, UnicodeDecodeError):
                                error = "unparsable_label"
                        data = sample[image_key] if image_key else b""
                        yield LabeledImage(key=key, label=label, data=data, label_error=error)
            except (tarfile.TarError, OSError, storage.StorageError) as exc:
                raise StageError(f"{shard}: unreadable WebDataset shard: {type(exc).__name__}: {exc}") from exc

    return LabeledImageSet(
        name=name or shard_list[0].rstrip("/").rsplit("/", 1)[-1].split(".")[0],
        source=shard_list[0] if len(shard_list) == 1 else f"{shard_list[0]} (+{len(shard_list) - 1} shards)",
        layout="webdataset",
        iter_samples=iterate,
        classnames=_wds_classnames(shard_list),
    )


def _expand(spec: str) -> list[str]:
    import braceexpand

    return [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]


def open_dataset(spec: str) -> LabeledImageSet:
    """Pick the loader from the layout.

    * ``*.tar`` / brace pattern / ``a.tar::b.tar`` / a prefix holding ``*.tar`` -> WebDataset;
    * a directory with ``labels.tsv`` -> flat layout;
    * any other directory -> ImageFolder.
    """
    if spec.endswith(".tar") or "{" in spec or "::" in spec:
        return load_webdataset(_expand(spec))
    if storage.is_s3(spec):
        shards = storage.list_uris(spec, ".tar")
        if not shards:
            raise StageError(f"{spec}: no .tar shards under this prefix")
        return load_webdataset(shards, name=spec.rstrip("/").rsplit("/", 1)[-1])
    base = storage.local_path(spec)
    if not base.exists():
        raise StageError(f"{spec}: dataset not found")
    if (base / "labels.tsv").is_file():
        return load_labels_tsv(base)
    tars = sorted(base.glob("*.tar"))
    if tars:
        return load_webdataset([str(t) for t in tars], name=base.name)
    return load_image_folder(base)


# --------------------------------------------------------------------------- class names & templates


def _split_key(uri: str) -> tuple[str, str | None]:
    """``file.json#imagenet1k`` -> (file.json, imagenet1k)."""
    if "#" in uri:
        path, key = uri.rsplit("#", 1)
        return path, key or None
    return uri, None


def _load_json(uri: str) -> Any:
    path, key = _split_key(uri)
    if path.startswith("builtin:"):
        name = path[len("builtin:") :]
        data = json.loads((ZEROSHOT_DATA_DIR / name).read_text("utf-8"))
    else:
        try:
            data = json.loads(storage.read_text(path))
        except json.JSONDecodeError as exc:
            raise StageError(f"{path}: not valid JSON: {exc}") from exc
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise StageError(f"{path}: has no key {key!r}")
        data = data[key]
    return data


def load_classnames(uri: str, dataset_name: str | None = None) -> list[str]:
    """A JSON list of class names, or a ``{dataset: [names]}`` file with ``#dataset`` (or the dataset's name)."""
    data = _load_json(uri)
    if isinstance(data, dict):
        if dataset_name in data:
            data = data[dataset_name]
        else:
            raise StageError(f"{uri}: a mapping of datasets {sorted(data)[:10]}...; pick one with {uri}#<name>")
    if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
        raise StageError(f"{uri}: class names must be a JSON list of strings")
    return data


def load_templates(uri: str, dataset_name: str | None = None) -> list[str] | dict[str, list[str]]:
    """Templates: a JSON list (``{c}`` or ``{}`` placeholder), ``{dataset: [...]}`` with ``#dataset``,
    or per-class prompt lists ``{classname: [prompts]}`` (CuPL style, as CLIP_benchmark accepts)."""
    data = _load_json(uri)
    if isinstance(data, dict) and dataset_name in data and isinstance(data[dataset_name], list):
        data = data[dataset_name]
    if isinstance(data, list):
        if not all(isinstance(t, str) for t in data) or not data:
            raise StageError(f"{uri}: templates must be a non-empty list of strings")
        return data
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return data
    raise StageError(f"{uri}: templates must be a list of strings or a mapping class -> prompts")


def default_templates() -> list[str]:
    """The 80 OpenAI ImageNet prompt templates."""
    return load_templates(f"builtin:{TEMPLATES_FILE}#imagenet1k")  # type: ignore[return-value]


def default_classnames(dataset: str) -> list[str]:
    """CLIP_benchmark's cleaned class names for a known dataset (e.g. imagenet1k, cifar10)."""
    return load_classnames(f"builtin:{CLASSNAMES_FILE}#{dataset}")


def class_prompts(classname: str, templates: list[str] | dict[str, list[str]]) -> list[str]:
    if isinstance(templates, dict):
        if classname not in templates:
            raise StageError(f"per-class templates have no prompts for class {classname!r}")
        return templates[classname]
    return [t.format(c=classname) if "{c}" in t else t.format(classname) for t in templates]


# --------------------------------------------------------------------------- protocol


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device.type, enabled=amp)


@torch.no_grad()
def build_classifier(
    model: LoadedClip, classnames: list[str], templates: list[str] | dict[str, list[str]], amp: bool = False
) -> torch.Tensor:
    """(embed_dim, n_classes) zero-shot weights; one text batch per class as CLIP_benchmark does."""
    columns = []
    with _autocast(model.device, amp):
        for classname in classnames:
            tokens = model.tokenizer(class_prompts(classname, templates)).to(model.device)
            embeddings = torch.nn.functional.normalize(model.model.encode_text(tokens), dim=-1).mean(dim=0)
            embeddings /= embeddings.norm()
            columns.append(embeddings)
    return torch.stack(columns, dim=1).to(model.device)


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


def _prepare(model: LoadedClip, sample: LabeledImage, n_classes: int) -> tuple[torch.Tensor | None, str | None]:
    """Decode + preprocess one sample; the second value is a bad:<reason> outcome."""
    from PIL import Image

    if sample.label is None:
        return None, sample.label_error or "missing_label"
    if not 0 <= sample.label < n_classes:
        return None, "label_out_of_range"
    try:
        data = sample.read()
        if not data:
            return None, "missing_image"
        with Image.open(io.BytesIO(data)) as img:
            return model.preprocess(img.convert("RGB")), None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this sample's outcome
        log.debug("%s: undecodable image: %s", sample.key, exc)
        return None, "undecodable_image"


def _batches(samples: Iterator[LabeledImage], size: int) -> Iterator[list[LabeledImage]]:
    batch: list[LabeledImage] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def zeroshot_eval(
    model: LoadedClip,
    dataset: LabeledImageSet,
    classnames: list[str],
    templates: list[str] | dict[str, list[str]],
    batch_size: int,
    *,
    amp: bool = False,
    decode_threads: int = 2,
    top_confusions: int = 20,
) -> ZeroShotResult:
    """Zero-shot classify every image of ``dataset`` against ``classnames`` x ``templates``.

    Images decode on a thread pool one batch ahead of the model. Labels index into ``classnames``.
    """
    if not classnames:
        raise StageError(f"{dataset.source}: no class names")
    classifier = build_classifier(model, classnames, templates, amp=amp)
    counts: Counter[str] = Counter()
    errors: list[str] = []
    keys: list[str] = []
    targets: list[int] = []
    logits: list[torch.Tensor] = []

    def prepare_batch(batch: list[LabeledImage]) -> tuple[list[LabeledImage], list[tuple[torch.Tensor | None, str | None]]]:
        return batch, list(pool.map(lambda s: _prepare(model, s, len(classnames)), batch))

    with concurrent.futures.ThreadPoolExecutor(max(1, decode_threads)) as pool, concurrent.futures.ThreadPoolExecutor(1) as ahead:
        pending = None
        for batch in _batches(iter(dataset), batch_size):
            future = ahead.submit(prepare_batch, batch)
            if pending is not None:
                _run_batch(model, classifier, amp, *pending.result(), counts, errors, keys, targets, logits)
            pending = future
        if pending is not None:
            _run_batch(model, classifier, amp, *pending.result(), counts, errors, keys, targets, logits)

    result = ZeroShotResult(
        dataset=dataset.name,
        model=model.name,
        weights=model.pretrained,
        classnames=list(classnames),
        n_templates=len(templates) if isinstance(templates, list) else max(len(v) for v in templates.values()),
        keys=keys,
        targets=np.asarray(targets, dtype=np.int64),
        logits=torch.cat(logits) if logits else torch.zeros((0, len(classnames))),
        counts=counts,
        errors=errors,
        top_confusions_n=top_confusions,
    )
    target_t = torch.as_tensor(result.targets)
    if len(classnames) >= 5:
        result.acc1, acc5 = topk_accuracy(result.logits, target_t, (1, 5))
        result.acc5 = acc5
    else:
        (result.acc1,) = topk_accuracy(result.logits, target_t, (1,))
    result.per_class = per_class_recall(result.targets, result.predictions)
    result.mean_per_class_recall = mean_per_class_recall(result.targets, result.predictions)
    return result


@torch.no_grad()
def _run_batch(
    model: LoadedClip,
    classifier: torch.Tensor,
    amp: bool,
    batch: list[LabeledImage],
    prepared: list[tuple[torch.Tensor | None, str | None]],
    counts: Counter[str],
    errors: list[str],
    keys: list[str],
    targets: list[int],
    logits: list[torch.Tensor],
) -> None:
    tensors = []
    for sample, (tensor, bad) in zip(batch, prepared):
        if bad is not None:
            counts[f"bad:{bad}"] += 1
            if len(errors) < MAX_LISTED_ERRORS:
                errors.append(f"{sample.key}: {bad}")
            continue
        counts["success"] += 1
        keys.append(sample.key)
        targets.append(int(sample.label))  # type: ignore[arg-type]
        tensors.append(tensor)
    if not tensors:
        return
    images = torch.stack(tensors).to(model.device)
    with _autocast(model.device, amp):
        features = torch.nn.functional.normalize(model.model.encode_image(images), dim=-1)
        batch_logits = 100.0 * features @ classifier
    logits.append(batch_logits.float().cpu())


# --------------------------------------------------------------------------- stage


def resolve_class_setup(
    dataset: LabeledImageSet, classnames_uri: str | None, templates_uri: str | None
) -> tuple[list[str], list[str] | dict[str, list[str]]]:
    """Class names: the given JSON, else the dataset's own; templates: the given JSON, else OpenAI's 80."""
    classnames = load_classnames(classnames_uri, dataset.name) if classnames_uri else dataset.classnames
    if not classnames:
        raise StageError(f"{dataset.source}: the layout names no classes; pass a class-names JSON")
    templates = load_templates(templates_uri, dataset.name) if templates_uri else default_templates()
    return classnames, templates


def write_report(result: ZeroShotResult, out_uri: str) -> ShardStats:
    """``zeroshot.json``, ``zeroshot.md`` and ``predictions.parquet`` (key, label, pred, top-5) under ``out_uri``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats = ShardStats()
    stats.counts.update(result.counts)
    body = json.dumps(result.to_dict(), indent=2, sort_keys=False).encode()
    storage.write_bytes(storage.join(out_uri, "zeroshot.json"), body)
    markdown = result.to_markdown().encode()
    storage.write_bytes(storage.join(out_uri, "zeroshot.md"), markdown)
    k = min(5, len(result.classnames))
    top = result.logits.topk(k, dim=1).indices.numpy() if len(result.keys) else np.zeros((0, k), dtype=np.int64)
    table = pa.table(
        {
            "key": result.keys,
            "label": pa.array(result.targets, pa.int64()),
            "pred": pa.array(result.predictions, pa.int64()),
            "topk": pa.array(top.tolist(), pa.list_(pa.int64())),
            "top1_logit": pa.array(result.logits.max(dim=1).values.numpy() if len(result.keys) else [], pa.float32()),
        }
    )
    predictions_uri = storage.join(out_uri, "predictions.parquet")
    with storage.atomic_local_path(predictions_uri) as tmp:
        pq.write_table(table, tmp)
        parquet_bytes = tmp.stat().st_size
    import hashlib

    stats.output_uri = storage.join(out_uri, "zeroshot.json")
    stats.bytes_written = len(body) + len(markdown) + parquet_bytes
    stats.checksum = hashlib.sha256(body).hexdigest()
    stats.extra = {"metrics": result.metrics(), "dataset": result.dataset, "n_classes": len(result.classnames)}
    return stats


def evaluate_zeroshot(
    model: LoadedClip,
    dataset_spec: str,
    out_uri: str,
    config: EvalConfig,
    classnames_uri: str | None = None,
    templates_uri: str | None = None,
) -> ShardStats:
    """The stage function: open the dataset, run the protocol, write the reports, return counts + metrics."""
    dataset = open_dataset(dataset_spec)
    classnames, templates = resolve_class_setup(
        dataset, classnames_uri or config.classnames, templates_uri or config.templates
    )
    result = zeroshot_eval(
        model,
        dataset,
        classnames,
        templates,
        config.batch_size,
        amp=config.precision == "amp",
        decode_threads=config.decode_threads,
        top_confusions=config.top_confusions,
    )
    return write_report(result, out_uri)
