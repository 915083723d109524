"""The CLIP stage's input side: a download shard's tar read by offset, decoded and preprocessed in
DataLoader workers, paired row for row with its parquet (see :mod:`laion_tasks.stages.clip`)."""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from laion_tasks import storage
from laion_tasks.config import ClipConfig
from laion_tasks.stage import StageError
from laion_tasks.wds import TarMember

log = logging.getLogger(__name__)


ClipStatus = Literal["scored", "no_image", "decode_error", "empty_caption"]
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

        # Images of one size are resized as one batch: the downloader writes one size per shard, so a
        # batch is usually one kernel call instead of one per image (the per-image launches bound the GPU path).
        size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for positions in by_shape.values():
            group = torch.stack([images[i] for i in positions])
            group = F.resize(group, size, interpolation=self.interpolation, antialias=True)
            group = F.center_crop(group, list(self.crop))
            for i, img in zip(positions, group):
                out[i] = img
        batch = torch.stack(out).float().div_(255.0)  # type: ignore[arg-type]
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
                out["jpeg"] = data  # packed into one tensor per batch by collate_pairs
            else:
                out["pixels"] = self.preprocess(open_image(data))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this sample's outcome
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["tokens"] = self.tokenizer([item.caption])[0] if out["error"] is None else None
        return out


def collate_pairs(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Keep failed samples out of the tensors but report them by row.

    Undecoded JPEGs travel as one packed uint8 tensor plus sizes (``split_jpegs`` unpacks them): a tensor per
    image costs the DataLoader one shared-memory file descriptor each, which bound the GPU path at ~1,600 pairs/s.
    """
    ok = [b for b in batch if b["error"] is None]
    pixel_items = [b for b in ok if b["pixels"] is not None]
    jpeg_items = [b for b in ok if b["jpeg"] is not None]
    packed = b"".join(b["jpeg"] for b in jpeg_items)
    return {
        "failed": [(b["row"], b["error"]) for b in batch if b["error"] is not None],
        "pixel_rows": [b["row"] for b in pixel_items],
        "pixels": torch.stack([b["pixels"] for b in pixel_items]) if pixel_items else None,
        "pixel_tokens": torch.stack([b["tokens"] for b in pixel_items]) if pixel_items else None,
        "jpeg_rows": [b["row"] for b in jpeg_items],
        "jpeg_data": torch.frombuffer(bytearray(packed), dtype=torch.uint8) if packed else None,
        "jpeg_sizes": [len(b["jpeg"]) for b in jpeg_items],
        "jpeg_tokens": torch.stack([b["tokens"] for b in jpeg_items]) if jpeg_items else None,
    }


def split_jpegs(batch: dict[str, Any]) -> list[torch.Tensor]:
    """The batch's JPEGs as 1-D uint8 views of its packed tensor, in ``jpeg_rows`` order."""
    if batch["jpeg_data"] is None:
        return []
    return list(torch.split(batch["jpeg_data"], batch["jpeg_sizes"]))


# --------------------------------------------------------------------------- shard inputs


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

