"""The CLIP stage's model side: encode pairs, score them, write the parquet and the fp16 embeddings
(see :mod:`laion_tasks.stages.clip`)."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from laion_tasks import storage
from laion_tasks.config import ClipConfig, ClipModelConfig, Settings
from laion_tasks.langid import LangIdOptions, detect_languages, language_group
from laion_tasks.models.clip import LoadedClip, cached_clip
from laion_tasks.progress import Progress, shard_label
from laion_tasks.stage import ShardStats, StageError
from laion_tasks.wds import index_images
from laion_tasks.stages.clip.data import (
    OUTCOME,
    OUTPUT_SCHEMA,
    PairItem,
    ShardPairs,
    TensorTransform,
    _loader_context,
    _read_inputs,
    _workers,
    collate_pairs,
    open_image,
    split_jpegs,
)

log = logging.getLogger(__name__)

TENSOR_DECODE_ON_CPU = False
"""Test hook: run the GPU decode path (torchvision decode_jpeg + tensor resize) on the CPU."""


# --------------------------------------------------------------------------- encoding


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. 'auto' is bf16 (fp16 without bf16 support) on CUDA, fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class PairEncoder:
    """One loaded model plus the execution knobs (AMP, channels-last, compile) for a shard run."""

    _compiled: dict[int, tuple[Callable, Callable]] = {}

    def __init__(self, clip: LoadedClip, config: ClipConfig) -> None:
        self.clip = clip
        self.device = clip.device
        self.amp_dtype = resolve_precision(config.precision, self.device)
        self.channels_last = config.channels_last
        if config.channels_last:
            clip.model.visual.to(memory_format=torch.channels_last)
        encode_image, encode_text = clip.model.encode_image, clip.model.encode_text
        if config.compile:
            key = id(clip.model)
            if key not in self._compiled:  # compile once per process and model
                self._compiled[key] = (torch.compile(encode_image), torch.compile(encode_text))
            encode_image, encode_text = self._compiled[key]
        self._encode_image, self._encode_text = encode_image, encode_text

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised fp32 (image, text) embeddings on the CPU."""
        non_blocking = self.device.type == "cuda"
        pixels = pixels.to(self.device, non_blocking=non_blocking)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        tokens = tokens.to(self.device, non_blocking=non_blocking)
        with self._autocast():
            img = self._encode_image(pixels)
            txt = self._encode_text(tokens)
        img = torch.nn.functional.normalize(img.float(), dim=-1)
        txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        return img.cpu(), txt.cpu()


def decode_jpegs_on_device(
    jpegs: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """Batched ``torchvision.io.decode_jpeg`` to RGB; on a batch failure retry one by one to isolate bad files."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        return list(decoded), [None] * len(jpegs)
    except Exception:  # noqa: BLE001 - find which file(s) broke the batch
        images: list[torch.Tensor | None] = []
        errors: list[str | None] = []
        for data in jpegs:
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                errors.append(None)
            except Exception as exc:  # noqa: BLE001
                images.append(None)
                errors.append(f"{type(exc).__name__}: {exc}")
        return images, errors


# --------------------------------------------------------------------------- the stage


def _score_group(
    encoder: PairEncoder,
    tar_path: Path,
    items: list[PairItem],
    config: ClipConfig,
    img_emb: np.ndarray,
    txt_emb: np.ndarray,
    similarity: np.ndarray,
    errors: dict[int, str],
    progress: Progress,
) -> None:
    """Encode every pair routed to one model; fills the output arrays in place by row."""
    clip = encoder.clip
    device = clip.device
    tensor_path = device.type == "cuda" or TENSOR_DECODE_ON_CPU
    tensor_transform = TensorTransform.from_open_clip(clip.preprocess) if tensor_path else None
    raw_jpeg = bool(config.gpu_jpeg_decode and tensor_transform is not None)
    if config.gpu_jpeg_decode and tensor_path and tensor_transform is None:
        log.info("%s: transform %s cannot be mirrored on the GPU; decoding with PIL", clip.name, clip.preprocess)
    dataset = ShardPairs(tar_path, items, clip.preprocess, clip.tokenizer, raw_jpeg)
    workers = min(_workers(config), max(1, len(items) // max(1, config.batch_size) + 1))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_pairs,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        multiprocessing_context=_loader_context(workers),
    )

    def put(rows: list[int], img: torch.Tensor, txt: torch.Tensor) -> None:
        idx = np.asarray(rows, dtype=np.int64)
        img_emb[idx] = img.numpy().astype(np.float16)
        txt_emb[idx] = txt.numpy().astype(np.float16)
        similarity[idx] = (img * txt).sum(dim=-1).numpy().astype(np.float32)

    by_row = {item.row: item for item in items}
    for batch in loader:
        for row, error in batch["failed"]:
            errors[row] = error
        if batch["pixels"] is not None:
            put(batch["pixel_rows"], *encoder.encode(batch["pixels"], batch["pixel_tokens"]))
        jpegs = split_jpegs(batch)
        if jpegs:
            assert tensor_transform is not None
            decoded, decode_errors = decode_jpegs_on_device(jpegs, device)
            good = [i for i, e in enumerate(decode_errors) if e is None]
            if good:
                pixels = tensor_transform([decoded[i] for i in good])  # type: ignore[misc]
                put([batch["jpeg_rows"][i] for i in good], *encoder.encode(pixels, batch["jpeg_tokens"][good]))
            # What nvjpeg rejects (CMYK, odd markers) may still decode with PIL: retry there.
            for i, err in enumerate(decode_errors):
                if err is None:
                    continue
                row = batch["jpeg_rows"][i]
                try:
                    pixels = clip.preprocess(open_image(bytes(jpegs[i].numpy()))).unsqueeze(0)
                except Exception as exc:  # noqa: BLE001
                    errors[row] = f"GPU decode: {err}; PIL: {type(exc).__name__}: {exc}"
                    continue
                put([row], *encoder.encode(pixels, clip.tokenizer([by_row[row].caption])))
        progress.advance(len(batch["failed"]) + len(batch["pixel_rows"]) + len(batch["jpeg_rows"]))


def _load_model(model_cfg: ClipModelConfig, config: ClipConfig) -> LoadedClip:
    return cached_clip(model_cfg.model, model_cfg.pretrained, model_cfg.checkpoint, config.device, config.seed)


def clip_score_shard(
    images_parquet_uri: str,
    tar_uri: str,
    out_parquet_uri: str,
    img_emb_uri: str,
    txt_emb_uri: str,
    config: ClipConfig,
    langid: LangIdOptions | None = None,
) -> ShardStats:
    """Score one download shard; write the per-row parquet and the two aligned fp16 embedding arrays.

    Every input row gets exactly one ``clip_status``: ``no_image`` (download failed),
    ``empty_caption``, ``decode_error``, or ``scored`` (no threshold here: see the module doc).
    """
    stats = ShardStats(output_uri=out_parquet_uri)
    started = time.perf_counter()
    inputs = _read_inputs(images_parquet_uri)
    n = len(inputs.keys)

    langid = langid or LangIdOptions()
    detections = detect_languages([c or "" for c in inputs.captions], langid)
    groups = [language_group(d, langid.threshold) for d in detections]

    english = config.english
    multi = config.multilingual if config.use_multilingual else config.english
    route_cfg: list[ClipModelConfig] = [multi if g == "multi" else english for g in groups]

    status: list[str | None] = [None] * n
    for i in range(n):
        if inputs.statuses[i] != "success":
            status[i] = "no_image"
        elif not (inputs.captions[i] or "").strip():
            status[i] = "empty_caption"

    similarity = np.full(n, np.nan, dtype=np.float32)
    errors: dict[int, str] = {}
    model_names: list[str | None] = [None] * n
    img_emb = txt_emb = None
    models_used: dict[str, dict[str, Any]] = {}

    with contextlib.ExitStack() as stack:
        todo = [i for i in range(n) if status[i] is None]
        tar_path = stack.enter_context(storage.local_copy(tar_uri)) if todo else None
        members = index_images(tar_path) if tar_path is not None else {}
        # Models are grouped by identity so that use_multilingual=False or equal configs load once.
        plan: dict[tuple, list[int]] = {}
        for i in todo:
            cfg = route_cfg[i]
            plan.setdefault((cfg.model, cfg.pretrained, cfg.checkpoint), []).append(i)
        loaded = {ident: _load_model(route_cfg[rows[0]], config) for ident, rows in plan.items()}
        dims = {clip.embed_dim for clip in loaded.values()}
        if len(dims) > 1:
            raise StageError(
                f"{images_parquet_uri}: the English and multilingual models embed into different sizes {sorted(dims)}; "
                "one shard's embedding arrays need one size"
            )
        dim = dims.pop() if dims else _load_model(english, config).embed_dim
        img_emb = np.zeros((n, dim), dtype=np.float16)
        txt_emb = np.zeros((n, dim), dtype=np.float16)
        progress = stack.enter_context(Progress(shard_label("clip", images_parquet_uri), len(todo), unit="pairs"))
        for ident, rows in plan.items():
            clip = loaded[ident]
            items = [PairItem(i, inputs.captions[i] or "", members.get(inputs.keys[i])) for i in rows]
            missing = sum(1 for it in items if it.member is None)
            if missing:
                log.warning("%s: %d samples marked success have no image in %s", images_parquet_uri, missing, tar_uri)
            t0 = time.perf_counter()
            _score_group(PairEncoder(clip, config), tar_path, items, config, img_emb, txt_emb, similarity, errors, progress)  # type: ignore[arg-type]
            models_used[clip.name] = {"pairs": len(rows), "seconds": round(time.perf_counter() - t0, 3)}
            for i in rows:
                model_names[i] = clip.name

    for i in range(n):
        if status[i] is not None:
            continue
        if i in errors or np.isnan(similarity[i]):
            status[i] = "decode_error"
            model_names[i] = None
            similarity[i] = np.nan
            img_emb[i] = 0
            txt_emb[i] = 0
            log.info("%s: key %s: decode error: %s", tar_uri, inputs.keys[i], errors.get(i, "not scored"))
        else:
            status[i] = "scored"
    has_embedding = np.array([s == "scored" for s in status], dtype=bool)

    for s in status:
        stats.add(OUTCOME[s])  # type: ignore[index]

    table = pa.table(
        {
            "key": inputs.keys,
            "uid": [None if u is None else str(u) for u in inputs.uids],
            "similarity": pa.array(similarity, type=pa.float32(), mask=~has_embedding),
            "clip_status": status,
            "clip_model": model_names,
            "language": [d.language or None for d in detections],
            "language_score": pa.array([d.confidence for d in detections], type=pa.float32()),
            "language_group": groups,
            "has_embedding": has_embedding,
        },
        schema=OUTPUT_SCHEMA,
    )
    img_bytes = storage.write_npy(img_emb_uri, img_emb)
    txt_bytes = storage.write_npy(txt_emb_uri, txt_emb)
    with storage.atomic_local_path(out_parquet_uri, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
        parquet_bytes = tmp.stat().st_size
        stats.checksum = storage.file_sha256(tmp)
    stats.bytes_written = parquet_bytes + img_bytes + txt_bytes
    elapsed = time.perf_counter() - started
    scored = int(has_embedding.sum())
    stats.extra = {
        "models": models_used,
        "embed_dim": int(img_emb.shape[1]),
        "scored_pairs": scored,
        "pairs_per_s": round(scored / elapsed, 2) if elapsed > 0 else None,
        "img_emb_uri": img_emb_uri,
        "txt_emb_uri": txt_emb_uri,
    }
    return stats


def score_with_settings(settings: Settings, images_parquet: str, tar: str, out_parquet: str, img_emb: str, txt_emb: str) -> ShardStats:
    """The CLIP stage with its knobs taken from the settings (the runner and ``laion clip-score``)."""
    return clip_score_shard(
        images_parquet, tar, out_parquet, img_emb, txt_emb, settings.clip,
        langid=settings.langid.options(),
    )
