"""Builders for a small synthetic shard as the download and clip stages write it (tar + parquets + embeddings)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from laion_tasks.langid import detect_languages, language_group

CAPTIONS = [
    "A red bicycle leaning against a brick wall in the old town",
    "Ein kleiner Hund spielt im Garten mit einem Ball",
    "Une belle maison au bord de la mer en été",
    "naked mole rat in the zoo",
    "xx",
    "Un gato negro duerme en el sofá de la casa",
    "sunset over the mountains with clouds",
    "Essex county map",
]


def make_image(seed: int, size: int = 96) -> Image.Image:
    """Random filled shapes on a background: edges give PDQ the mid-frequency content real photos have."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(size // 10, size // 2, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    return image


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Shard:
    images_parquet: str
    tar: str
    clip_parquet: str
    img_emb: str
    out: str
    keys: list[str]
    urls: list[str]
    image_bytes: dict[str, bytes]
    embeddings: np.ndarray


def make_shard(
    tmp: Path,
    n: int = 8,
    dim: int = 64,
    failed: tuple[int, ...] = (4,),
    no_embedding: tuple[int, ...] = (),
    compact_embeddings: bool = False,
    seed: int = 0,
    prefix: str = "000000",
    images: dict[int, Image.Image] | None = None,
) -> Shard:
    """``n`` samples; rows in ``failed`` have a failed download (not in the tar)."""
    tmp.mkdir(parents=True, exist_ok=True)
    keys = [f"{prefix}{i:04d}" for i in range(n)]
    urls = [f"https://example.com/img/{prefix}/{i}.jpg" for i in range(n)]
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    status = ["failed_to_download" if i in failed else "success" for i in range(n)]
    image_bytes: dict[str, bytes] = {}
    tar_path = tmp / f"{prefix}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, key in enumerate(keys):
            if status[i] != "success":
                continue
            img = (images or {}).get(i)
            img = make_image(seed * 1000 + i) if img is None else img
            data = jpeg_bytes(img)
            image_bytes[key] = data
            for ext, payload in (
                ("jpg", data),
                ("txt", caps[i].encode()),
                ("json", json.dumps({"key": key, "url": urls[i], "caption": caps[i]}).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    sha = [hashlib.sha256(image_bytes[k]).hexdigest() if k in image_bytes else None for k in keys]
    pq.write_table(
        pa.table(
            {
                "key": keys,
                "uid": [hashlib.md5(f"{u}\x00{c}".encode()).hexdigest() for u, c in zip(urls, caps)],
                "url": urls,
                "caption": caps,
                "status": status,
                "width": [96 if s == "success" else None for s in status],
                "height": [96 if s == "success" else None for s in status],
                "sha256": sha,
            }
        ),
        tmp / f"{prefix}.parquet",
    )
    rng = np.random.default_rng(seed)
    has = np.array([status[i] == "success" and i not in no_embedding for i in range(n)])
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[~has] = 0
    clip_uids = pq.read_table(tmp / f"{prefix}.parquet").column("uid").to_pylist()
    detections = detect_languages(caps)  # the clip stage's language columns, as it computes them
    pq.write_table(
        pa.table(
            {
                "key": keys,
                "uid": clip_uids,
                "similarity": [0.3 if h else None for h in has],
                "clip_status": ["success" if h else "no_image" for h in has],
                "language": [d.language or None for d in detections],
                "language_score": pa.array([d.confidence for d in detections], pa.float32()),
                "language_group": [language_group(d, 0.5) for d in detections],
                "has_embedding": has.tolist(),
            }
        ),
        tmp / f"{prefix}.clip.parquet",
    )
    stored = emb[has] if compact_embeddings else emb
    np.save(tmp / f"{prefix}.img.npy", stored.astype(np.float16))
    return Shard(
        images_parquet=str(tmp / f"{prefix}.parquet"),
        tar=str(tar_path),
        clip_parquet=str(tmp / f"{prefix}.clip.parquet"),
        img_emb=str(tmp / f"{prefix}.img.npy"),
        out=str(tmp / "tags" / f"{prefix}.parquet"),
        keys=keys,
        urls=urls,
        image_bytes=image_bytes,
        embeddings=emb,
    )


TINY_CLIP = {"english": {"model": "laion-tiny-clip", "pretrained": None}, "device": "cpu"}
