"""Damaged copies of the real 2016 WAT: reading goes on after a corrupt gzip member, and a
record whose Content-Length lies does not take the records after it down without a status."""

from __future__ import annotations

import gzip
import re
import zlib
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion_tasks.config import ExtractConfig
from laion_tasks.stage import ShardStats
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


Row = tuple[str, str, str]


def rows(uri: str) -> list[Row]:
    """(url, alt, record_id) of every output row, in output order."""
    table = pq.read_table(uri, columns=["url", "alt", "record_id"])
    return list(zip(*(table.column(c).to_pylist() for c in ("url", "alt", "record_id"))))


@pytest.fixture(scope="module")
def baseline(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ShardStats, list[Row]]:
    """The undamaged WAT's stats and rows: what every damaged copy is compared with, row for row."""
    out = tmp_path_factory.mktemp("resync") / "base.parquet"
    stats = extract_wat(str(shared_data / HEAD500), str(out), CONFIG)
    return stats, rows(str(out))


def record_id_of(data: bytes, offsets: list[int], m: int) -> str:
    record = gzip.decompress(data[offsets[m] : offsets[m + 1]])
    return re.search(rb"WARC-Record-ID: (<[^>]+>)", record).group(1).decode()  # type: ignore[union-attr]


def without_record(base_rows: list[Row], record_id: str) -> tuple[list[Row], list[Row]]:
    """(rows of every other record, rows of ``record_id``) of the undamaged extraction.

    Exactly the first list is what a copy that loses only that record must give. (A pair of the
    lost record that a later record repeats would come back from there; the records damaged
    below have no such pair, so the comparison is exact.)
    """
    return [r for r in base_rows if r[2] != record_id], [r for r in base_rows if r[2] == record_id]


def assert_same_rows(kept: list[Row], expected: list[Row]) -> None:
    """The same rows, each as often (order aside: a record whose length lies is parsed after the ones it swallowed)."""
    missing, unexpected = Counter(expected) - Counter(kept), Counter(kept) - Counter(expected)
    assert not missing and not unexpected, (
        f"{sum(missing.values())} rows missing, e.g. {sorted(missing)[:3]}; "
        f"{sum(unexpected.values())} unexpected, e.g. {sorted(unexpected)[:3]}"
    )


def member_with_links(data: bytes, offsets: list[int], after: int) -> int:
    """The first member from ``after`` whose record has IMG links with alt text (so damage costs something)."""
    for m in range(after, len(offsets) - 1):
        body = gzip.decompress(data[offsets[m] : offsets[m + 1]])
        if b'"IMG@/src"' in body and b'"alt":"' in body:
            return m
    raise AssertionError("no member with IMG links")


def test_a_flipped_byte_in_an_early_member_loses_only_that_record(
    wat: tuple[bytes, list[int]], baseline: tuple[ShardStats, list[Row]], tmp_path: Path
) -> None:
    data, offsets = wat
    base_stats, base_rows = baseline
    m = member_with_links(data, offsets, 3)
    record_id = record_id_of(data, offsets, m)
    broken = bytearray(data)
    broken[(offsets[m] + offsets[m + 1]) // 2] ^= 0x10
    path = tmp_path / "flipped.warc.wat.gz"
    path.write_bytes(bytes(broken))
    out = str(tmp_path / "flipped.parquet")

    stats = extract_wat(str(path), out, CONFIG)

    assert stats.counts["bad:corrupt_gzip"] == 1  # the damaged span has a status (lineage stores the counts)
    assert stats.extra["damaged_spans"] == [[offsets[m], offsets[m + 1]]]
    assert stats.extra["stream_end"] == "complete"
    assert stats.extra["records_read"] == base_stats.extra["records_read"] - 1
    undamaged, lost = without_record(base_rows, record_id)
    assert lost, f"member {m} ({record_id}) gave no rows: the damage would cost nothing"
    assert_same_rows(rows(out), undamaged)


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


@pytest.mark.parametrize("liar_is", ["a record with links", "the record before one with links"])
@pytest.mark.parametrize("delta", [5, 300, 10_000_000])
def test_a_content_length_that_runs_into_the_next_record(
    wat: tuple[bytes, list[int]], baseline: tuple[ShardStats, list[Row]], tmp_path: Path, delta: int, liar_is: str
) -> None:
    """The liar keeps its rows; the record it runs into is lost with a status; every other row is there."""
    data, offsets = wat
    _, base_rows = baseline
    with_links = member_with_links(data, offsets, 6)
    m = with_links if liar_is == "a record with links" else with_links - 1
    path = tmp_path / "lying.warc.wat.gz"
    path.write_bytes(_with_content_length(data, offsets, m, delta))
    stats = extract_wat(str(path), str(tmp_path / "l.parquet"), CONFIG)
    kept = rows(str(tmp_path / "l.parquet"))
    assert stats.extra["records_with_wrong_content_length"] == 1
    assert stats.extra["metadata_records"] == len(offsets) - 2  # every record is accounted for
    if delta == 10_000_000:
        # The false length claimed the rest of the file: every record after it is read again.
        assert not {k for k in stats.counts if k.startswith("bad:")}
        assert_same_rows(kept, base_rows)
    else:
        # The next record lost its start to the liar: it gets a status, nothing else is lost.
        assert stats.counts["bad:cut_by_wrong_content_length"] == 1
        undamaged, lost = without_record(base_rows, record_id_of(data, offsets, m + 1))
        # Neither case is trivial: the liar's own rows must survive, or the cut record's rows must go.
        if liar_is == "a record with links":
            assert any(r[2] == record_id_of(data, offsets, m) for r in undamaged)
        else:
            assert lost
        assert_same_rows(kept, undamaged)


def test_a_short_content_length_gives_the_cut_record_a_status(wat: tuple[bytes, list[int]], tmp_path: Path) -> None:
    data, offsets = wat
    m = member_with_links(data, offsets, 5)
    path = tmp_path / "short.warc.wat.gz"
    path.write_bytes(_with_content_length(data, offsets, m, -300))
    stats = extract_wat(str(path), str(tmp_path / "s.parquet"), CONFIG)
    assert stats.counts["bad:truncated_json"] == 1
    assert stats.extra["records_read"] == len(offsets) - 1
