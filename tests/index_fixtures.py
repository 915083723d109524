"""Generated CLIP-stage outputs and subsets for the index/serve tests.

Image embeddings are the tiny model's text embeddings of the captions, so a text query
for a caption must find its own sample first: the tests can fail for real.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import layout

SNAPSHOT = "CC-TEST-2024-01"
SUBSET = "laion2B-en"
THINGS = ["cat", "dog", "screw", "suitcase", "bicycle", "teapot", "mountain", "violin", "lighthouse", "pizza"]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]


@dataclass
class Generated:
    root: Path
    embedding_uris: list[str]
    clip_uris: list[str]
    subset_uris: list[str]
    captions: dict[str, str]
    """key -> caption of every subset row with an embedding."""
    no_embedding_keys: list[str]
    not_in_subset_keys: list[str]
    missing_from_clip: int
    duplicate_pair: tuple[str, str]
    """Two keys with identical embeddings (the second a near-duplicate of the first)."""
    unscored_keys: set[str] = field(default_factory=set)
    """Subset rows with no safety score (punsafe null): search must never return them."""


def caption_for(i: int) -> str:
    return f"a photo of a {COLORS[i % len(COLORS)]} {THINGS[(i // len(COLORS)) % len(THINGS)]} number {i}"


def generate(
    root: Path,
    encode,  # type: ignore[no-untyped-def]
    shards: int = 2,
    rows_per_shard: int = 30,
    url_base: str = "http://127.0.0.1:9/img",
) -> Generated:
    """Write clip/<shard>.parquet + .img.npy and subsets/<SUBSET>/part-0.parquet under ``root``."""
    captions: dict[str, str] = {}
    subset_rows: list[dict] = []
    no_emb: list[str] = []
    not_in_subset: list[str] = []
    unscored: set[str] = set()
    embedding_uris, clip_uris = [], []
    all_caps = [caption_for(i) for i in range(shards * rows_per_shard)]
    vectors = encode(all_caps).astype(np.float16)
    dim = vectors.shape[1]
    rng = np.random.default_rng(0)
    dup_pair: tuple[str, str] | None = None
    for s in range(shards):
        shard = layout.shard_name(s)
        keys, uids, has = [], [], []
        emb = np.zeros((rows_per_shard, dim), dtype=np.float16)
        for r in range(rows_per_shard):
            i = s * rows_per_shard + r
            key = f"{shard}{r:04d}"
            uid = hashlib.sha1(all_caps[i].encode()).hexdigest()[:16]
            keys.append(key)
            uids.append(uid)
            with_embedding = r % 10 != 7  # every 10th-ish row failed to download
            has.append(with_embedding)
            if with_embedding:
                emb[r] = vectors[i]
            if s == 0 and r == 1:
                emb[r] = emb[0]  # a near-duplicate image of row 0
                dup_pair = (keys[0], key)
            in_subset = r % 10 != 3
            if not in_subset:
                not_in_subset.append(key)
                continue
            if not with_embedding:
                no_emb.append(key)
            else:
                captions[key] = all_caps[i]
            if r % 6 == 5:
                unscored.add(key)
            subset_rows.append(
                {
                    "URL": f"{url_base}/{key}.png",
                    "TEXT": all_caps[i],
                    "WIDTH": 64 + r,
                    "HEIGHT": 48 + r,
                    "similarity": float(0.28 + 0.01 * (r % 5)),
                    "LANGUAGE": "en" if r % 4 else "de",
                    "punsafe": None if key in unscored else float(rng.uniform(0, 1)),
                    "pwatermark": float(rng.uniform(0, 1)),
                    "aesthetic": float(rng.uniform(3, 8)),
                    "hash": hashlib.md5(f"{uid}".encode()).hexdigest(),
                    "sha256": hashlib.sha256(key.encode()).hexdigest(),
                    "status": "success",
                    "key": key,
                    "uid": uid,
                }
            )
        table = pa.table(
            {
                "key": keys,
                "uid": uids,
                "similarity": pa.array([0.3] * rows_per_shard, pa.float32()),
                "clip_status": ["success" if h else "no_image" for h in has],
                "language": ["en"] * rows_per_shard,
                "language_group": ["en"] * rows_per_shard,
                "has_embedding": has,
            }
        )
        clip_uri = layout.clip_parquet_uri(str(root), SNAPSHOT, shard)
        emb_uri = layout.clip_image_emb_uri(str(root), SNAPSHOT, shard)
        Path(clip_uri).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, clip_uri)
        np.save(emb_uri, emb)
        clip_uris.append(clip_uri)
        embedding_uris.append(emb_uri)
    plan = Path(layout.shards_manifest_uri(str(root), SNAPSHOT))  # the download plan that names the shards
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_text(json.dumps({"shard_size": rows_per_shard, "candidates": {},
                                "shards": {layout.shard_name(s): "fixture" for s in range(shards)}}))
    # A subset row whose sample the CLIP stage never saw.
    orphan = dict(subset_rows[0], key="999999999", uid="orphan", URL=f"{url_base}/orphan.png")
    subset_rows.append(orphan)
    subset_dir = Path(layout.subset_dir(str(root), SNAPSHOT, SUBSET))
    subset_dir.mkdir(parents=True, exist_ok=True)
    subset_uri = str(subset_dir / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(subset_rows), subset_uri)
    assert dup_pair is not None
    return Generated(root, embedding_uris, clip_uris, [subset_uri], captions, no_emb, not_in_subset, 1, dup_pair, unscored)


def tiny_encoder():  # type: ignore[no-untyped-def]
    """The tiny CLIP text encoder as the serve app will load it (same cache, same seed)."""
    from laion_tasks.models.clip import cached_clip, encode_texts

    settings = tiny_settings()
    cfg = settings.clip.english
    model = cached_clip(cfg.model, cfg.pretrained, cfg.checkpoint, settings.clip.device, settings.clip.seed)
    return lambda texts: encode_texts(model, texts).numpy()


def tiny_settings(**serve_overrides):  # type: ignore[no-untyped-def]
    from laion_tasks.config import load_settings

    return load_settings(
        environ={},
        overrides={
            "clip": {"english": {"model": "laion-tiny-clip", "pretrained": None}, "device": "cpu"},
            "serve": serve_overrides,
        },
    )
