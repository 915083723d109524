"""CLIP scoring: image-text cosine similarity, the caption's language and fp16 embeddings per shard.

Input is one download shard: a WebDataset tar (``KEY.jpg``/``KEY.webp`` + ``.txt`` + ``.json``)
and the parquet of *all* its samples (``status == "success"`` means the image is in the tar).
Output, aligned row for row with that parquet:

* a parquet with ``similarity``, ``clip_status`` and the caption's language. No threshold is
  applied here: curate and dedup compare the stored similarity with ``clip.*.threshold``,
  so changing a threshold re-runs curation, never GPU scoring;
* two ``.npy`` fp16 arrays (image and text embeddings, L2-normalised, zeros where
  ``has_embedding`` is false) that the index stage memory-maps.

As in LAION-5B, English captions are scored with the English model (threshold 0.28 for
ViT-B/32), other detected languages with the multilingual model (0.26), and captions with no
detected language with the English model; ``language_group`` records the route.

Throughput: a torch DataLoader reads the tar by offset in parallel workers, decodes and
preprocesses with the model's own open_clip transform (bit-identical to open_clip), and pins
memory on CUDA. On CUDA, JPEGs can instead be decoded batched on the GPU with
``torchvision.io.decode_jpeg`` and resized there: close to, not bit-identical with, the PIL
path (see tests). AMP (bf16/fp16) on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from laion_tasks import layout, storage
from laion_tasks.config import ClipConfig, ClipModelConfig, Settings
from laion_tasks.langid import LANGID_FIELDS, LangIdOptions, detect_languages, language_group
from laion_tasks.models.clip import LoadedClip, cached_clip
from laion_tasks.progress import Progress, shard_label
from laion_tasks.stage import Context, ShardStats, StageError, StageSpec

log = logging.getLogger(__name__)

TENSOR_DECODE_ON_CPU = False
"""Test hook: run the GPU decode path (torchvision decode_jpeg + tensor resize) on the CPU."""

ClipStatus = Literal["scored", "no_image", "decode_error", "empty_caption"]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "webp", "png")
JPEG_EXTENSIONS = ("jpg", "jpeg")
OUTCOME = {
    "scored": "success",
    "decode_error": "fail:decode_error",
    "empty_caption": "fail:empty_caption",
    "no_image": "skip:no_image",
}
OUTPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uid", pa.string()),
        ("similarity", pa.float32()),
        ("clip_status", pa.string()),
        ("clip_model", pa.string()),
        ("language", pa.string()),
        ("language_score", pa.float32()),
        ("language_group", pa.string()),
        ("has_embedding", pa.bool_()),
    ]
)


# --------------------------------------------------------------------------- tar access


@dataclass(frozen=True)
class TarMember:
    """Where an image's bytes sit inside the uncompressed tar, so workers can pread them."""

    offset: int
    size: int
    ext: str


def webdataset_key(member_name: str) -> tuple[str, str]:
    """WebDataset's split: the key is the path up to the first dot of the basename."""
    directory, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def index_tar_images(tar_path: Path) -> dict[str, TarMember]:
    """Key -> image member for an uncompressed tar (tarfile reads headers only, not payloads)."""
    out: dict[str, TarMember] = {}
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = webdataset_key(member.name)
                if ext in IMAGE_EXTENSIONS and key not in out:
                    out[key] = TarMember(member.offset_data, member.size, ext)
    except tarfile.TarError as exc:
        raise StageError(f"{tar_path}: not a readable uncompressed tar: {exc}") from exc
    return out


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class TensorTransform:
    """open_clip's eval transform (resize shorter side, center crop, normalise) on uint8 CHW tensors.

    Used after GPU JPEG decoding. Built from the model's own Compose so sizes, interpolation
    and mean/std always match it; ``from_open_clip`` returns None for transforms it cannot
    mirror, and the caller then stays on the exact PIL path.
    """

    resize: int | tuple[int, int]
    interpolation: Any
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_open_clip(cls, preprocess: Any) -> "TensorTransform | None":
        from torchvision import transforms as T

        steps = list(getattr(preprocess, "transforms", []))
        names = [type(s).__name__ for s in steps]
        if names != ["Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize"]:
            return None
        resize, crop, _, _, norm = steps
        if resize.max_size is not None:
            return None
        size = resize.size if isinstance(resize.size, int) else tuple(resize.size)
        if isinstance(size, tuple) and len(size) == 1:
            size = size[0]
        assert isinstance(resize, T.Resize)
        return cls(size, resize.interpolation, tuple(crop.size), tuple(norm.mean), tuple(norm.std))

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 [3,H,W] tensors (any size, any device) -> normalised float [N,3,crop,crop]."""
        from torchvision.transforms.v2 import functional as F

        out = []
        for img in images:
            size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
            img = F.resize(img, size, interpolation=self.interpolation, antialias=True)
            img = F.center_crop(img, list(self.crop))
            out.append(img)
        batch = torch.stack(out).float().div_(255.0)
        mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1)
        return batch.sub_(mean).div_(std)


def open_image(data: bytes) -> Any:
    """Decode with Pillow and force the full decode, so truncated files fail here, not later."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class PairItem:
    row: int
    caption: str
    member: TarMember | None
    """None when the parquet says success but the tar holds no image for the key."""


class ShardPairs(torch.utils.data.Dataset):
    """Map-style dataset over the scorable pairs of one shard: pread + decode + preprocess + tokenize.

    Runs in DataLoader workers. JPEGs are handed over undecoded when ``raw_jpeg`` is set
    (GPU decode); everything else goes through the model's open_clip transform.
    """

    def __init__(
        self,
        tar_path: Path,
        items: list[PairItem],
        preprocess: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        raw_jpeg: bool,
    ) -> None:
        self.tar_path = tar_path
        self.items = items
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.raw_jpeg = raw_jpeg
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, member: TarMember) -> bytes:
        if self._fd is None or self._pid != os.getpid():  # one descriptor per worker process
            self._fd = os.open(self.tar_path, os.O_RDONLY)
            self._pid = os.getpid()
        data = os.pread(self._fd, member.size, member.offset)
        if len(data) != member.size:
            raise OSError(f"short read: {len(data)} of {member.size} bytes at offset {member.offset}")
        return data

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        out: dict[str, Any] = {"row": item.row, "pixels": None, "jpeg": None, "error": None}
        try:
            if item.member is None:
                raise FileNotFoundError("the parquet says success but the tar holds no image for this key")
            data = self._read(item.member)
            if self.raw_jpeg and item.member.ext in JPEG_EXTENSIONS:
                out["jpeg"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                out["pixels"] = self.preprocess(open_image(data))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this sample's outcome
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["tokens"] = self.tokenizer([item.caption])[0] if out["error"] is None else None
        return out


def collate_pairs(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Keep failed samples out of the tensors but report them by row."""
    ok = [b for b in batch if b["error"] is None]
    pixel_items = [b for b in ok if b["pixels"] is not None]
    jpeg_items = [b for b in ok if b["jpeg"] is not None]
    return {
        "failed": [(b["row"], b["error"]) for b in batch if b["error"] is not None],
        "pixel_rows": [b["row"] for b in pixel_items],
        "pixels": torch.stack([b["pixels"] for b in pixel_items]) if pixel_items else None,
        "pixel_tokens": torch.stack([b["tokens"] for b in pixel_items]) if pixel_items else None,
        "jpeg_rows": [b["row"] for b in jpeg_items],
        "jpegs": [b["jpeg"] for b in jpeg_items],
        "jpeg_tokens": torch.stack([b["tokens"] for b in jpeg_items]) if jpeg_items else None,
    }


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


@dataclass
class _Inputs:
    keys: list[str]
    uids: list[str | None]
    captions: list[str | None]
    statuses: list[str | None]


def _read_inputs(images_parquet_uri: str) -> _Inputs:
    with storage.local_copy(images_parquet_uri) as path:
        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise StageError(f"{images_parquet_uri}: not a readable parquet file: {exc}") from exc
        missing = [c for c in ("key", "caption", "status") if c not in schema.names]
        if missing:
            raise StageError(f"{images_parquet_uri}: missing columns {missing} (a download shard needs key, caption, status)")
        columns = ["key", "caption", "status"] + (["uid"] if "uid" in schema.names else [])
        table = pq.read_table(path, columns=columns)
    n = table.num_rows
    return _Inputs(
        keys=[str(k) for k in table.column("key").to_pylist()],
        uids=table.column("uid").to_pylist() if "uid" in columns else [None] * n,
        captions=table.column("caption").to_pylist(),
        statuses=table.column("status").to_pylist(),
    )


def _loader_context(workers: int) -> Any:
    """``fork`` for the DataLoader workers, whatever Python's default start method is.

    ``spawn``/``forkserver`` (Python 3.14's default) re-run the host's ``__main__`` in each worker:
    in an Airflow task process that is the ``airflow`` script, which initialises Airflow and dies
    (see :mod:`laion_tasks.subproc`). A forked worker only runs the dataset's decode and tokenizer
    code and never touches CUDA, so it is safe; where fork does not exist, torch's default is used.
    """
    if workers <= 0 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    _allow_children()
    return multiprocessing.get_context("fork")


def _allow_children() -> None:
    """Let this process start DataLoader workers even if it inherited a "daemon" mark.

    Celery's prefork pool marks its processes daemonic, and an Airflow task process forked from
    one inherits the mark: multiprocessing then refuses every child ("daemonic processes are not
    allowed to have children") and the CLIP stage fails under the CeleryExecutor. The mark
    describes the pool process, not this forked task process, and the DataLoader's own workers
    are daemonic and exit when their parent dies (torch's watchdog), so it is cleared.
    """
    current = multiprocessing.current_process()
    if current.daemon:
        log.info("clearing the daemon mark inherited by %s so DataLoader workers can start", current.name)
        current.daemon = False


def _workers(config: ClipConfig) -> int:
    return config.num_workers if config.num_workers > 0 else min(8, os.cpu_count() or 1)


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
        if batch["jpegs"]:
            assert tensor_transform is not None
            decoded, decode_errors = decode_jpegs_on_device(batch["jpegs"], device)
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
                    pixels = clip.preprocess(open_image(bytes(batch["jpegs"][i].numpy()))).unsqueeze(0)
                except Exception as exc:  # noqa: BLE001
                    errors[row] = f"GPU decode: {err}; PIL: {type(exc).__name__}: {exc}"
                    continue
                put([row], *encoder.encode(pixels, clip.tokenizer([by_row[row].caption])))
        progress.advance(len(batch["failed"]) + len(batch["pixel_rows"]) + len(batch["jpeg_rows"]))


def _load_model(model_cfg: ClipModelConfig, config: ClipConfig) -> LoadedClip:
    return cached_clip(model_cfg.model, model_cfg.pretrained, model_cfg.checkpoint, config.device, config.seed)


def _write_npy(uri: str, array: np.ndarray) -> tuple[int, str]:
    with storage.atomic_local_path(uri, suffix=".npy") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        return tmp.stat().st_size, storage.file_sha256(tmp)


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
        members = index_tar_images(tar_path) if tar_path is not None else {}
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
    img_bytes, _ = _write_npy(img_emb_uri, img_emb)
    txt_bytes, _ = _write_npy(txt_emb_uri, txt_emb)
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


# -- the stage's declaration ---------------------------------------------------------


def score_with_settings(settings: Settings, images_parquet: str, tar: str, out_parquet: str, img_emb: str, txt_emb: str) -> ShardStats:
    """The CLIP stage with its knobs taken from the settings (the runner and ``laion clip-score``)."""
    lang = settings.tag
    return clip_score_shard(
        images_parquet, tar, out_parquet, img_emb, txt_emb, settings.clip,
        langid=lang.langid(),
    )


def _run_clip(ctx: Context, shard: str) -> ShardStats:
    root, snap = ctx.root, ctx.snapshot
    return score_with_settings(
        ctx.settings,
        layout.images_parquet_uri(root, snap, shard),
        layout.images_tar_uri(root, snap, shard),
        layout.clip_parquet_uri(root, snap, shard),
        layout.clip_image_emb_uri(root, snap, shard),
        layout.clip_text_emb_uri(root, snap, shard),
    )


def _download_shards(ctx: Context) -> list[str]:
    from laion_tasks.stages.regroup import download_shard_ids

    return download_shard_ids(ctx)


SPEC = StageSpec(
    name="clip",
    reads=("download",),
    # The models, and the language ID that routes each pair to one of them; the device, the precision
    # (bf16/fp16 autocast on a GPU) and the JPEG decoder (nvJPEG or PIL), which change the embeddings.
    # Not the thresholds: curate applies them to the stored similarity. Not batch_size, workers,
    # channels_last, compile, pod knobs (stage.EXECUTION_ONLY).
    result_fields=("clip.*.model", "clip.*.pretrained", "clip.*.checkpoint", "clip.use_multilingual", "clip.seed",
                   "clip.device", "clip.precision", "clip.gpu_jpeg_decode", *LANGID_FIELDS),
    output=lambda ctx, shard: layout.clip_parquet_uri(ctx.root, ctx.snapshot, shard),
    run_shard=_run_clip,
    shards=_download_shards,
    plan_name="shards",
    input_uri=lambda ctx, shard: layout.images_parquet_uri(ctx.root, ctx.snapshot, shard),
    section="clip",
)
