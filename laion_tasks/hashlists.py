"""Operator-supplied safety hash lists (IWF, NCMEC/C3P style): URL, image-byte and PDQ hashes.

The lists are never shipped with the project. Matching happens twice: the download
stage checks the URL *before* fetching, the bytes right after, and the PDQ hash of the
decoded image before it is resized (so a listed image, its thumbnail and its embedding are
never written), and the tag stage re-checks every sample against the current lists
(URL, original sha256, stored bytes, PDQ), because lists grow after a crawl.

The lists enter the tag stage's skip key by content (sha256 of the file, or its S3 ETag;
``StageSpec.input_files``), not by path: a list edited in place re-runs tag on every shard,
and the download stage, whose key leaves them out, downloads nothing again. What only the
download can check is the md5 / sha1 of the *original* bytes (only their sha256 is kept):
a list that grows after a crawl should list images by sha256 or PDQ.

List file format (UTF-8 text, any storage URI)::

    # comment lines and trailing "# ..." comments are ignored, as are blank lines
    md5:5d41402abc4b2a76b9719d911017c592      <- explicit algorithm prefix
    2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824   <- inferred by length

* one lowercase or uppercase hex digest per line, optionally prefixed ``algo:``
  with algo one of ``md5``, ``sha1``, ``sha256`` (URL and image lists) or ``pdq``;
* without a prefix the algorithm follows from the length: 32 hex = md5, 40 = sha1,
  64 = sha256, except in the PDQ list, where 64 hex = pdq;
* PDQ hashes use Facebook's canonical hex (``Hash256::format``: word 15 first), which
  is what ThreatExchange and the ``pdqhash`` bit vector packed MSB-first give.

URL normalisation: none. The hash is taken over the URL string exactly as it appears
in the candidate parquet, encoded as UTF-8 (no lower-casing, no trimming, no
percent-decoding), so an operator hashes lists the same way: ``md5(url.encode())``.

Logs and stats carry only counts and hashes, never a URL.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import numpy as np

from laion_tasks import storage
from laion_tasks.config import HashListsConfig

if TYPE_CHECKING:
    from PIL import Image

    from laion_tasks.stage import Context

log = logging.getLogger(__name__)

DIGEST_ALGOS = {"md5": 32, "sha1": 40, "sha256": 64}
_LOCK = threading.Lock()
"""The download stage checks PDQ in several decode threads: one index build, exact counts."""
_BY_LENGTH = {length: algo for algo, length in DIGEST_ALGOS.items()}


class HashListError(ValueError):
    """A hash list file is malformed; the message names the file and line."""


def parse_hashlist(text: str, source: str, kind: str) -> dict[str, set[bytes]]:
    """Parse a list file into ``{algo: {digest bytes}}``; ``kind`` is url, image or pdq."""
    allowed = {"pdq"} if kind == "pdq" else ({"md5", "sha256"} if kind == "url" else set(DIGEST_ALGOS))
    out: dict[str, set[bytes]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        algo, sep, digest = line.partition(":")
        if not sep:
            digest = algo
            algo = "pdq" if kind == "pdq" and len(digest) == 64 else _BY_LENGTH.get(len(digest), "")
        algo, digest = algo.strip().lower(), digest.strip().lower()
        expected = 64 if algo == "pdq" else DIGEST_ALGOS.get(algo)
        if algo not in allowed or expected is None:
            raise HashListError(f"{source}:{lineno}: algorithm {algo or '?'!r} not allowed in a {kind} list ({sorted(allowed)})")
        if len(digest) != expected:
            raise HashListError(f"{source}:{lineno}: {algo} digest must be {expected} hex characters, got {len(digest)}")
        try:
            out.setdefault(algo, set()).add(bytes.fromhex(digest))
        except ValueError as exc:
            raise HashListError(f"{source}:{lineno}: not hexadecimal") from exc
    return out


def hashlists_for(ctx: "Context") -> "HashLists | None":
    """The lists of ``ctx.settings.hashlists``, loaded once per context and per content version: the skip
    key (:func:`laion_tasks.stage.file_identity`) and the lists used are the same version of each file."""
    from laion_tasks.stage import file_identity

    config = ctx.settings.hashlists
    uris = (config.url, config.image, config.pdq)
    version = [file_identity(ctx, uri) if uri else "-" for uri in uris]
    return ctx.resource("hashlists:" + ",".join(version), lambda: HashLists.from_config(config))


def pdq_hash(image: "Image.Image") -> tuple[bytes, int]:
    """PDQ hash (32 bytes, canonical bit order) and quality (0-100) of an image.

    Uses the ``pdqhash`` package (Facebook's reference C++ via Cython).
    """
    import pdqhash

    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    vector, quality = pdqhash.compute(rgb)
    return np.packbits(vector.astype(np.uint8)).tobytes(), int(quality)


@dataclass
class HashLists:
    """In-memory hash sets; PDQ hashes go into a faiss binary index for Hamming range search."""

    url: dict[str, set[bytes]] = field(default_factory=dict)
    image: dict[str, set[bytes]] = field(default_factory=dict)
    pdq: np.ndarray | None = None
    """(N, 32) uint8 PDQ hashes."""
    pdq_max_distance: int = 31
    matches: Counter[str] = field(default_factory=Counter)
    """Counts of matches by list kind (``url``, ``image``, ``pdq``): safe to log."""
    _pdq_index: object = None

    def __getstate__(self) -> dict[str, object]:
        """Pickled for the download workers without the faiss index (rebuilt there on first use)."""
        return {**self.__dict__, "_pdq_index": None}

    @classmethod
    def from_config(cls, config: HashListsConfig) -> "HashLists | None":
        """Load the lists named in ``hashlists.url`` / ``image`` / ``pdq``; None when none is set."""
        if not (config.url or config.image or config.pdq):
            return None
        lists = cls(pdq_max_distance=config.pdq_max_distance)
        if config.url:
            lists.url = parse_hashlist(storage.read_text(config.url), config.url, "url")
        if config.image:
            lists.image = parse_hashlist(storage.read_text(config.image), config.image, "image")
        if config.pdq:
            pdq = parse_hashlist(storage.read_text(config.pdq), config.pdq, "pdq").get("pdq", set())
            lists.set_pdq(pdq)
        log.info("hash lists loaded: %s", lists.sizes())
        return lists

    def sizes(self) -> dict[str, int]:
        return {
            "url": sum(len(v) for v in self.url.values()),
            "image": sum(len(v) for v in self.image.values()),
            "pdq": 0 if self.pdq is None else int(self.pdq.shape[0]),
        }

    def set_pdq(self, hashes: Iterable[bytes]) -> None:
        rows = sorted(hashes)
        self.pdq = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, 32) if rows else None
        self._pdq_index = None

    def url_blocked(self, url: str) -> bool:
        """True if md5 or sha256 of ``url.encode('utf-8')`` is listed. Call BEFORE fetching."""
        if not self.url:
            return False
        data = url.encode("utf-8")
        hit = any(hashlib.new(algo, data).digest() in digests for algo, digests in self.url.items())
        if hit:
            self.matches["url"] += 1
        return hit

    def image_blocked(self, data: bytes, sha256: bytes | None = None) -> bool:
        """True if md5, sha1 or sha256 of the image bytes is listed. Call before writing them.

        ``sha256``: the bytes' digest when the caller already has it (the download stage hashes each body once).
        """
        if not self.image:
            return False

        def digest(algo: str) -> bytes:
            return sha256 if algo == "sha256" and sha256 is not None else hashlib.new(algo, data).digest()

        hit = any(digest(algo) in digests for algo, digests in self.image.items())
        if hit:
            self.matches["image"] += 1
        return hit

    def digest_blocked(self, algo: str, hex_digest: str | None) -> bool:
        """True if an already computed digest (e.g. the download parquet's sha256 of the original bytes) is listed."""
        if not hex_digest or algo not in self.image:
            return False
        try:
            hit = bytes.fromhex(hex_digest) in self.image[algo]
        except ValueError:
            return False
        if hit:
            self.matches["image"] += 1
        return hit

    def pdq_hash_blocked(self, hashes: bytes | np.ndarray) -> np.ndarray:
        """For a (N, 32) uint8 array (or one 32-byte hash): is any listed PDQ hash within the Hamming threshold?"""
        query = np.frombuffer(hashes, dtype=np.uint8).reshape(-1, 32) if isinstance(hashes, bytes) else hashes
        if self.pdq is None or query.shape[0] == 0:
            return np.zeros(query.shape[0], dtype=bool)
        if self._pdq_index is None:
            with _LOCK:
                if self._pdq_index is None:
                    import faiss

                    index = faiss.IndexBinaryFlat(256)
                    index.add(np.ascontiguousarray(self.pdq))
                    self._pdq_index = index
        distances, _ = self._pdq_index.search(np.ascontiguousarray(query, dtype=np.uint8), 1)  # type: ignore[attr-defined]
        hit = distances[:, 0] <= self.pdq_max_distance
        if hit.any():
            with _LOCK:
                self.matches["pdq"] += int(hit.sum())
        return hit

    def pdq_blocked(self, image: "Image.Image") -> bool:
        """True if the image's PDQ hash is within ``pdq_max_distance`` bits of a listed hash."""
        if self.pdq is None:
            return False
        digest, _quality = pdq_hash(image)
        return bool(self.pdq_hash_blocked(digest)[0])
