"""Build small download shards (WebDataset tar + parquet of every sample) for the clip stage.

The layout follows the download stage's contract: the tar holds ``KEY.jpg``/``KEY.webp``,
``KEY.txt`` and ``KEY.json`` for the samples that have an image; the parquet has one row
per sample, with ``status == "success"`` exactly for those. Used by the tests and by
``bench/clip_bench.py``, so it must not depend on pytest.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


@dataclass
class FixtureSample:
    key: str
    caption: str | None
    image: bytes | None
    """Encoded image bytes as they go into the tar; None means the download failed."""
    ext: str = "jpg"
    status: str | None = None
    """Defaults to ``success`` when there is an image, ``failed_to_download`` otherwise."""


def encode_image(img: Image.Image, fmt: str = "JPEG", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def synthetic_image(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A deterministic, non-trivial RGB picture (gradients plus blocks) of the given size."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            (xx / max(w - 1, 1)) * 255,
            (yy / max(h - 1, 1)) * 255,
            ((xx + yy) / max(w + h - 2, 1)) * 255,
        ],
        axis=-1,
    )
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        base[y0 : y0 + h // 4, x0 : x0 + w // 4] = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 12, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def write_shard(directory: Path, samples: Iterable[FixtureSample], name: str = "000000") -> tuple[Path, Path]:
    """Write ``name.tar`` and ``name.parquet`` into ``directory``; returns (parquet, tar)."""
    directory.mkdir(parents=True, exist_ok=True)
    tar_path = directory / f"{name}.tar"
    parquet_path = directory / f"{name}.parquet"
    rows: dict[str, list] = {
        c: []
        for c in (
            "key", "uid", "url", "caption", "status", "error_message", "width", "height",
            "original_width", "original_height", "original_bytes", "sha256",
        )
    }
    with tarfile.open(tar_path, "w") as tar:
        for i, sample in enumerate(samples):
            status = sample.status or ("success" if sample.image is not None else "failed_to_download")
            width = height = ow = oh = None
            if sample.image is not None:
                try:
                    with Image.open(io.BytesIO(sample.image)) as im:
                        width, height = im.size
                        ow, oh = im.size
                except Exception:  # noqa: BLE001 - fixtures may hold deliberately broken bytes
                    pass
            meta = {"key": sample.key, "caption": sample.caption, "status": status}
            if sample.image is not None and status == "success":
                members = [
                    (f"{sample.key}.{sample.ext}", sample.image),
                    (f"{sample.key}.txt", (sample.caption or "").encode()),
                    (f"{sample.key}.json", json.dumps(meta).encode()),
                ]
                for member_name, payload in members:
                    info = tarfile.TarInfo(member_name)
                    info.size = len(payload)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(payload))
            rows["key"].append(sample.key)
            rows["uid"].append(f"uid-{sample.key}")
            rows["url"].append(f"http://example.test/{sample.key}.{sample.ext}")
            rows["caption"].append(sample.caption)
            rows["status"].append(status)
            rows["error_message"].append(None if status == "success" else "fixture: no image")
            rows["width"].append(width)
            rows["height"].append(height)
            rows["original_width"].append(ow)
            rows["original_height"].append(oh)
            rows["original_bytes"].append(len(sample.image) if sample.image is not None else None)
            rows["sha256"].append(None)
    schema = pa.schema(
        [
            ("key", pa.string()), ("uid", pa.string()), ("url", pa.string()), ("caption", pa.string()),
            ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
            ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
            ("original_bytes", pa.int64()), ("sha256", pa.string()),
        ]
    )
    pq.write_table(pa.table(rows, schema=schema), parquet_path)
    return parquet_path, tar_path


def skimage_samples(shared_data: Path, start: int = 0) -> list[FixtureSample]:
    """The 8 skimage images with their CLIP-notebook captions, re-encoded as JPEG like the downloader does."""
    root = shared_data / "images" / "skimage_clip8"
    out = []
    lines = (root / "captions.tsv").read_text().strip().splitlines()
    for i, line in enumerate(lines):
        parts = line.split("\t")
        if len(parts) < 2 or parts[0].lower() in ("file", "filename", "image"):
            continue
        fname, caption = parts[0], parts[1]
        path = root / fname
        if not path.exists():
            continue
        with Image.open(path) as img:
            out.append(FixtureSample(f"{start + len(out):09d}", caption, encode_image(img.convert("RGB"))))
    return out
