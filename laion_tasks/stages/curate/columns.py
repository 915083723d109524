"""Curate's output layout: LAION's columns, the hash, the manifest and file names."""

from __future__ import annotations

import hashlib
import logging
import re


from laion_tasks.snapshot_db import (  # noqa: F401 - eligibility is defined with the samples view
    BASE_OUTCOMES,
    ELIGIBLE,
    base_checks,
    base_outcome_sql,
    eligible_sql,
)
log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WDS_DIR = "webdataset"
PART_RE = re.compile(r"^part-\d{5,}\.parquet$")
TAR_RE = re.compile(r"^\d{5,}\.tar$")

HASH_DEFINITION = (
    "hash: signed 64-bit integer = the first 8 bytes (big-endian) of SHA-256 over the UTF-8 of URL || TEXT "
    "(no separator). LAION's column was a 64-bit hash of url+text too, but with a different function: "
    "compare hashes only within data curated by this pipeline."
)

# LAION's parquet layout (URL, TEXT, WIDTH, HEIGHT, similarity, LANGUAGE, punsafe, pwatermark,
# aesthetic, hash) plus ours. WIDTH/HEIGHT are the original image's, as in LAION.
LAION_COLUMNS_SQL = """
  url AS "URL",
  caption AS "TEXT",
  original_width AS "WIDTH",
  original_height AS "HEIGHT",
  similarity,
  language AS "LANGUAGE",
  punsafe,
  pwatermark,
  aesthetic_score AS aesthetic,
  CAST(CASE WHEN h64 >= 9223372036854775808 THEN h64::HUGEINT - 18446744073709551616
            ELSE h64::HUGEINT END AS BIGINT) AS hash,
  sha256,
  status,
  key,
  uid
"""
LAION_COLUMNS = [
    "URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "LANGUAGE", "punsafe", "pwatermark", "aesthetic",
    "hash", "sha256", "status", "key", "uid",
]  # fmt: skip

# Where to look when a column is entirely NULL.
_NULL_HINTS = {
    "aesthetic_score": "no aesthetic predictor weights configured (tag.aesthetic_weights)",
    "punsafe": "no safety scores (tag.nsfw_weights or CLIP prompts) were computed",
    "pwatermark": "no watermark scores (tag.watermark_weights or CLIP prompts) were computed",
}


def laion_hash(url: str, text: str) -> int:
    """The ``hash`` column for one pair, as the SQL computes it (for tests and consumers)."""
    digest = hashlib.sha256((url + text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)
