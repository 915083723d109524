"""The one WebDataset tar reader: one key rule, one set of image extensions.

A sample's files share a key: WebDataset's rule, the member path up to the first dot of its
basename (``dir/KEY.ext.more`` -> ``dir/KEY``, ``ext.more``). The pipeline writes no directories,
so a key is the download Parquet's ``key``. Used by clip (offsets, for reads by DataLoader workers),
tag (whole samples, to hash and rewrite) and curate / the card (samples of a subset).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from laion_tasks.stage import StageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "webp", "png")
"""A sample's image member, in order of preference."""


def split_member(name: str) -> tuple[str, str]:
    """(key, lower-case extension) of a tar member name; the extension is '' when there is none."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (ext.lower() if dot else "")


@dataclass(frozen=True)
class TarMember:
    offset: int
    size: int
    ext: str


def index_images(tar_path: Path) -> dict[str, TarMember]:
    """Key -> image member of an uncompressed tar (reads the headers, not the payloads)."""
    out: dict[str, TarMember] = {}
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member(member.name)
                if ext in IMAGE_EXTENSIONS and key not in out:
                    out[key] = TarMember(member.offset_data, member.size, ext)
    except tarfile.TarError as exc:
        raise StageError(f"{tar_path}: not a readable uncompressed tar: {exc}") from exc
    return out


def iter_samples(source: Path | IO[bytes], wanted: set[str] | None = None) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]:
    """(key, members with their bytes) per sample, in tar order, streaming; only ``wanted`` keys when given."""
    current: str | None = None
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    opened = tarfile.open(source, "r:*") if isinstance(source, Path) else tarfile.open(fileobj=source, mode="r|*")
    with opened as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _ext = split_member(info.name)
            if wanted is not None and key not in wanted:
                continue
            if current is not None and key != current:
                yield current, members
                members = []
            current = key
            extracted = tar.extractfile(info)
            members.append((info, extracted.read() if extracted else b""))
    if current is not None:
        yield current, members


def sample_files(members: list[tuple[tarfile.TarInfo, bytes]]) -> dict[str, bytes]:
    """A sample's members as {extension: bytes}."""
    return {split_member(info.name)[1]: data for info, data in members}


def image_bytes(files: dict[str, bytes]) -> bytes | None:
    """The sample's image, by :data:`IMAGE_EXTENSIONS` order."""
    return next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
