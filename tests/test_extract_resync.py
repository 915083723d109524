"""Damaged copies of the real 2016 WAT: reading goes on after a corrupt gzip member, and a
record whose Content-Length lies does not take the records after it down without a status."""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion_tasks.config import ExtractConfig
from laion_tasks.stages.extract import extract_wat

HEAD500 = "wat/cc-2016-40_head500/CC-MAIN-20160924173739-00000-ip-10-143-35-109.head500.warc.wat.gz"
CONFIG = ExtractConfig()


@pytest.fixture(scope="module")
def wat(shared_data: Path) -> tuple[bytes, list[int]]:
    """The real WAT's bytes and its gzip member offsets (one member per record, as CC writes them)."""
    path = shared_data / HEAD500
    if not path.exists():
        pytest.skip(f"{path} is missing (the shared test data is not present)")
    data = path.read_bytes()
    offsets, pos = [], 0
    while pos < len(data):
        decomp = zlib.decompressobj(31)
        decomp.decompress(data[pos:])
        offsets.append(pos)
        pos = len(data) - len(decomp.unused_data)
    return data, [*offsets, len(data)]


def pairs(uri: str) -> set[tuple[str, str]]:
    table = pq.read_table(uri, columns=["url", "alt", "record_id"])
    return set(zip(table.column("url").to_pylist(), table.column("alt").to_pylist()))


def member_with_links(data: bytes, offsets: list[int], after: int) -> int:
    """The first member from ``after`` whose record has IMG links with alt text (so damage costs something)."""
    for m in range(after, len(offsets) - 1):
        body = gzip.decompress(data[offsets[m] : offsets[m + 1]])
        if b'"IMG@/src"' in body and b'"alt":"' in body:
            return m
    raise AssertionError("no member with IMG links")


def test_a_flipped_byte_in_an_early_member_loses_only_that_record(
    wat: tuple[bytes, list[int]], shared_data: Path, tmp_path: Path
) -> None:
    data, offsets = wat
    baseline = extract_wat(str(shared_data / HEAD500), str(tmp_path / "base.parquet"), CONFIG)
    m = member_with_links(data, offsets, 3)
    damaged_record = gzip.decompress(data[offsets[m] : offsets[m + 1]])
    record_id = re.search(rb"WARC-Record-ID: (<[^>]+>)", damaged_record).group(1).decode()  # type: ignore[union-attr]
    broken = bytearray(data)
    broken[(offsets[m] + offsets[m + 1]) // 2] ^= 0x10
    path = tmp_path / "flipped.warc.wat.gz"
    path.write_bytes(bytes(broken))
    out = str(tmp_path / "flipped.parquet")

    stats = extract_wat(str(path), out, CONFIG)

    assert stats.counts["bad:corrupt_gzip"] == 1  # the damaged span has a status (lineage stores the counts)
    assert stats.extra["damaged_spans"] == [[offsets[m], offsets[m + 1]]]
    assert stats.extra["stream_end"] == "complete"
    assert stats.extra["records_read"] == baseline.extra["records_read"] - 1
    base_table = pq.read_table(str(tmp_path / "base.parquet"))
    undamaged = {
        (u, a)
        for u, a, r in zip(*(base_table.column(c).to_pylist() for c in ("url", "alt", "record_id")))
        if r != record_id
    }
    kept = pairs(out)
    assert len(kept & undamaged) >= 0.99 * len(undamaged)
    assert len(kept) < len(pairs(str(tmp_path / "base.parquet")))  # the damaged record's links are gone


def test_several_damaged_members_and_a_damaged_last_one(wat: tuple[bytes, list[int]], tmp_path: Path) -> None:
    data, offsets = wat
    broken = bytearray(data)
    for m in (2, 3, 40, len(offsets) - 2):
        broken[offsets[m] + 30] ^= 0xFF
    path = tmp_path / "many.warc.wat.gz"
    path.write_bytes(bytes(broken))
    stats = extract_wat(str(path), str(tmp_path / "many.parquet"), CONFIG)
    spans = stats.extra["damaged_spans"]
    # Adjacent damaged members are one span; a damaged last member ends the file.
    assert spans == [[offsets[2], offsets[4]], [offsets[40], offsets[41]], [offsets[-2], None]]
    assert stats.counts["bad:corrupt_gzip"] == len(spans)
    assert stats.extra["records_read"] == len(offsets) - 1 - 4
    assert stats.extra["stream_end"] == "corrupt_gzip"


def _with_content_length(data: bytes, offsets: list[int], m: int, delta: int) -> bytes:
    record = gzip.decompress(data[offsets[m] : offsets[m + 1]])
    n = int(re.search(rb"Content-Length: (\d+)", record).group(1))  # type: ignore[union-attr]
    lying = re.sub(rb"Content-Length: \d+", b"Content-Length: %d" % (n + delta), record, count=1)
    return data[: offsets[m]] + gzip.compress(lying) + data[offsets[m + 1] :]


@pytest.mark.parametrize("delta", [5, 300, 10_000_000])
def test_a_content_length_that_runs_into_the_next_record(
    wat: tuple[bytes, list[int]], shared_data: Path, tmp_path: Path, delta: int
) -> None:
    data, offsets = wat
    extract_wat(str(shared_data / HEAD500), str(tmp_path / "b.parquet"), CONFIG)
    baseline = pairs(str(tmp_path / "b.parquet"))
    m = member_with_links(data, offsets, 5)
    path = tmp_path / "lying.warc.wat.gz"
    path.write_bytes(_with_content_length(data, offsets, m, delta))
    stats = extract_wat(str(path), str(tmp_path / "l.parquet"), CONFIG)
    kept = pairs(str(tmp_path / "l.parquet"))
    assert stats.extra["records_with_wrong_content_length"] == 1
    assert stats.extra["metadata_records"] == len(offsets) - 2  # every record is accounted for
    if delta == 10_000_000:
        # The false length claimed the rest of the file: every record after it is read again.
        assert not {k for k in stats.counts if k.startswith("bad:")}
        assert kept == baseline
    else:
        # The next record lost its start to the liar: it gets a status, nothing else is lost.
        assert stats.counts["bad:cut_by_wrong_content_length"] == 1
        assert len(kept & baseline) >= 0.99 * len(baseline)


def test_a_short_content_length_gives_the_cut_record_a_status(wat: tuple[bytes, list[int]], tmp_path: Path) -> None:
    data, offsets = wat
    m = member_with_links(data, offsets, 5)
    path = tmp_path / "short.warc.wat.gz"
    path.write_bytes(_with_content_length(data, offsets, m, -300))
    stats = extract_wat(str(path), str(tmp_path / "s.parquet"), CONFIG)
    assert stats.counts["bad:truncated_json"] == 1
    assert stats.extra["records_read"] == len(offsets) - 1
