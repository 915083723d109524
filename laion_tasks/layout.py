"""Where each stage's outputs live under ``<root>/<snapshot>/``.

Shard ids are stable: the same input gives the same ids on every run, so a re-run
overwrites (atomically) rather than duplicates.
"""

from __future__ import annotations

import hashlib
import re

from laion_tasks.storage import join

# One path segment a caller may name (snapshot, subset, card file): no separators, no "." or "..".
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def check_name(value: str, what: str = "name") -> str:
    """``value`` if it is one safe path segment, else ValueError: names from outside (a URL,
    a form) must never climb out of ``<root>/<snapshot>/``."""
    if not SAFE_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"invalid {what} {value!r}: use letters, digits, '.', '_', '-' (one path segment)")
    return value


def wat_id(wat_uri: str) -> str:
    """A stable, readable id for a WAT file: its basename without extensions, plus a short hash of the full URI."""
    base = wat_uri.rstrip("/").rsplit("/", 1)[-1]
    base = re.sub(r"(\.warc)?\.wat(\.gz)?$", "", base)
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[:120]
    return f"{base}-{hashlib.sha1(wat_uri.encode()).hexdigest()[:8]}"


def snapshot_root(root: str, snapshot: str) -> str:
    return join(root, snapshot)


def candidates_uri(root: str, snapshot: str, wat: str) -> str:
    return join(root, snapshot, "candidates", f"{wat}.parquet")


def wat_manifest_uri(root: str, snapshot: str) -> str:
    """The extract plan: the WAT file URIs of this run, one per line."""
    return join(root, snapshot, "manifests", "wat_files.txt")


def shards_manifest_uri(root: str, snapshot: str) -> str:
    """The download plan: which candidate files the shards were cut from, and each shard's checksum."""
    return join(root, snapshot, "shards", "manifest.json")


def candidates_dir(root: str, snapshot: str) -> str:
    return join(root, snapshot, "candidates")


def shard_name(index: int) -> str:
    return f"{index:06d}"


def shard_input_uri(root: str, snapshot: str, shard: str) -> str:
    return join(root, snapshot, "shards", f"{shard}.parquet")


def shards_dir(root: str, snapshot: str) -> str:
    return join(root, snapshot, "shards")


def images_tar_uri(root: str, snapshot: str, shard: str) -> str:
    return join(root, snapshot, "images", f"{shard}.tar")


def images_parquet_uri(root: str, snapshot: str, shard: str) -> str:
    return join(root, snapshot, "images", f"{shard}.parquet")


def clip_parquet_uri(root: str, snapshot: str, shard: str) -> str:
    return join(root, snapshot, "clip", f"{shard}.parquet")


def clip_image_emb_uri(root: str, snapshot: str, shard: str) -> str:
    return join(root, snapshot, "clip", f"{shard}.img.npy")


def clip_text_emb_uri(root: str, snapshot: str, shard: str) -> str:
    return join(root, snapshot, "clip", f"{shard}.txt.npy")


def tags_parquet_uri(root: str, snapshot: str, shard: str) -> str:
    return join(root, snapshot, "tags", f"{shard}.parquet")


def dedup_dir(root: str, snapshot: str) -> str:
    return join(root, snapshot, "dedup")


def subset_dir(root: str, snapshot: str, subset: str) -> str:
    return join(root, snapshot, "subsets", subset)


def card_dir(root: str, snapshot: str) -> str:
    return join(root, snapshot, "card")


def index_dir(root: str, snapshot: str, subset: str) -> str:
    return join(root, snapshot, "index", subset)


CHECKPOINT_NAME = "epoch_latest.pt"
"""open_clip_train's last checkpoint: the one a training run keeps."""


def model_dir(root: str, snapshot: str, subset: str) -> str:
    """One training run on a subset: its checkpoint, ``train.log``, ``train.json`` and ``eval/``."""
    return join(root, snapshot, "models", subset)


def checkpoint_uri(model_dir: str) -> str:
    """The checkpoint in a training run's directory (the layout's :func:`model_dir`, or ``laion train --out``):
    where the trainer writes it and every reader (eval, the card, the DAG) looks for it."""
    return join(model_dir, CHECKPOINT_NAME)


def eval_dir(root: str, snapshot: str, subset: str) -> str:
    """The zero-shot evaluation of the model trained on a subset."""
    return join(model_dir(root, snapshot, subset), "eval")
