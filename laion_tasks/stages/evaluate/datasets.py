"""Evaluation datasets: the labelled image layouts, class names and prompt templates.

:func:`open_dataset` picks the reader by layout: an ImageFolder-style directory, the flat
``labels.tsv`` layout (``filename``, ``class_index``), or WebDataset shards whose samples
carry a ``.cls`` label. A sample with a missing or unparsable label is still yielded (with
``label_error``), so the run can give it a ``bad:<reason>`` outcome instead of losing it.
Class names and templates come from JSON files or from the built-in CLIP_benchmark lists.
"""

from __future__ import annotations

import contextlib
import csv
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from laion_tasks import storage
from laion_tasks.stage import StageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""torchvision's ImageFolder extensions."""
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
WDS_LABEL_KEYS = ("cls", "cls2", "label")
ZEROSHOT_DATA_DIR = Path(__file__).resolve().parents[2] / "zeroshot_data"
CLASSNAMES_FILE = "en_classnames.json"
TEMPLATES_FILE = "en_zeroshot_classification_templates.json"


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


def resolve_class_setup(
    dataset: LabeledImageSet, classnames_uri: str | None, templates_uri: str | None
) -> tuple[list[str], list[str] | dict[str, list[str]]]:
    """Class names: the given JSON, else the dataset's own; templates: the given JSON, else OpenAI's 80."""
    classnames = load_classnames(classnames_uri, dataset.name) if classnames_uri else dataset.classnames
    if not classnames:
        raise StageError(f"{dataset.source}: the layout names no classes; pass a class-names JSON")
    templates = load_templates(templates_uri, dataset.name) if templates_uri else default_templates()
    return classnames, templates
