"""The zero-shot evaluation run: classifier, batched inference, and the written report.

The classifier follows ``clip_benchmark.metrics.zeroshot_classification`` step for step:
class embedding = mean of the L2-normalised embeddings of one class's prompts,
renormalised (one text batch per class, as CLIP_benchmark does, so the floating point sums
are the same); logits = 100 * normalised image embedding @ classifier; prediction = argmax.
Every input sample ends in one outcome: ``success`` or ``bad:<reason>``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
from collections import Counter
from typing import Any, Iterator

import numpy as np
import torch

from laion_tasks import storage
from laion_tasks.config import EvalConfig
from laion_tasks.models.clip import LoadedClip
from laion_tasks.stage import ShardStats, StageError
from laion_tasks.stages.evaluate.datasets import (
    LabeledImage,
    LabeledImageSet,
    class_prompts,
    open_dataset,
    resolve_class_setup,
)
from laion_tasks.stages.evaluate.metrics import ZeroShotResult, mean_per_class_recall, per_class_recall, topk_accuracy

log = logging.getLogger(__name__)

MAX_LISTED_ERRORS = 50


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
