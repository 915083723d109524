"""Extract stage: real Common Crawl WATs, broken inputs, URL resolution, S3/HTTP input, WAT listing."""

from __future__ import annotations

import gzip
import http.server
import io
import json
import random
import threading
from functools import partial
from pathlib import Path
from typing import Iterator
from urllib.parse import urljoin

import orjson
import pyarrow.parquet as pq
import pytest

from laion_tasks import storage
from laion_tasks.config import ExtractConfig
from laion_tasks.fixtures.wat import FixturePage, warc_record, wat_records, write_wat
from laion_tasks.stage import StageError
from laion_tasks.stages.extract import extract_wat, list_wat_files
from laion_tasks.stages.extract.links import COLUMNS, _Resolver, candidate_uid

HEAD500 = "wat/cc-2016-40_head500/CC-MAIN-20160924173739-00000-ip-10-143-35-109.head500.warc.wat.gz"
TRIPLE = "wat/cc-2014-35_triple/CC-MAIN-20140820021334-00006-ip-10-180-136-8.ec2.internal.warc.wat"
SINGLE_2023 = "wat/cc-2023-06_single/CC-MAIN-sample2.warc.wat.gz"
WHIRLWIND = "wat/cc-2024-22_whirlwind/whirlwind.warc.wat.gz"
CONFIG = ExtractConfig()


def read_rows(uri: str) -> list[dict]:
    with storage.local_copy(uri) as path:
        return pq.read_table(path).to_pylist()


def assert_every_img_link_accounted(stats) -> None:  # type: ignore[no-untyped-def]
    link_outcomes = sum(n for k, n in stats.counts.items() if k == "kept" or k.startswith("drop:"))
    assert link_outcomes == stats.extra["img_links"]


def reference_pairs(path: Path) -> set[tuple[str, str]]:
    """cc2dataset's extraction logic, re-stated independently, with the documented filters.

    Full JSON parse of every record, urljoin for every relative URL, no byte pre-check.
    """
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    pairs: set[tuple[str, str]] = set()
    with open(path, "rb") as handle:
        for record in ArchiveIterator(handle, record_types=WarcRecordType.metadata, parse_http=False):
            doc = orjson.loads(record.reader.read())
            meta = doc["Envelope"]["Payload-Metadata"].get("HTTP-Response-Metadata", {}).get("HTML-Metadata", {})
            if "Links" not in meta:
                continue
            base = page = doc["Envelope"]["WARC-Header-Metadata"]["WARC-Target-URI"]
            if "Base" in meta.get("Head", {}):
                base = urljoin(page, meta["Head"]["Base"])
            for link in meta.get("Links", []):
                if link.get("path") != "IMG@/src" or not link.get("alt"):
                    continue
                url = link["url"]
                if not url.startswith(("http://", "https://")):
                    url = urljoin(base, url)
                alt = " ".join(link["alt"].split())
                if len(alt) >= 5 and url.startswith(("http://", "https://")):
                    pairs.add((url, alt))
    return pairs


# --- real Common Crawl WAT files -------------------------------------------------------------


def test_real_2016_head500_counts_and_columns(shared_data: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "head500.parquet")
    stats = extract_wat(str(shared_data / HEAD500), out, CONFIG)
    # MANIFEST: 786 distinct (url, alt) pairs after the documented filters, as cc2dataset gives.
    # 29 of them come from <img src=""> that cc2dataset resolves to the page URL itself: not an
    # image, so we drop them as drop:no_url. The other 757 are kept.
    assert stats.counts["kept"] == 757
    assert stats.counts["drop:no_url"] == 29
    assert stats.extra["metadata_records"] == 500
    assert stats.extra["records_with_img_links"] == 147  # MANIFEST: 147 pages with IMG
    assert stats.extra["stream_end"] == "complete"
    assert not any(k.startswith("bad:") for k in stats.counts)
    assert_every_img_link_accounted(stats)
    rows = read_rows(out)
    assert len(rows) == 757
    assert set(rows[0]) >= set(COLUMNS)
    assert len({(r["url"], r["alt"]) for r in rows}) == 757
    for row in rows:
        assert row["url"].startswith(("http://", "https://"))
        assert len(row["alt"]) >= 5 and row["alt"] == " ".join(row["alt"].split())
        assert row["uid"] == candidate_uid(row["url"], row["alt"])
        assert row["wat_file"] == str(shared_data / HEAD500)
        assert row["record_date"].startswith("2016-09-") and row["record_id"].startswith("<urn:uuid:")
    assert stats.bytes_written == Path(out).stat().st_size and len(stats.checksum or "") == 64


def test_real_2016_parity_with_reference_extraction(shared_data: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "head500.parquet")
    extract_wat(str(shared_data / HEAD500), out, CONFIG)
    ours = {(r["url"], r["alt"]) for r in read_rows(out)}
    reference = reference_pairs(shared_data / HEAD500)
    assert len(reference) == 786
    assert ours <= reference
    # the only difference: empty src attributes, which urljoin turns into the page URL
    extra = reference - ours
    assert len(extra) == 29
    pages = {r["page_url"] for r in read_rows(out)}
    assert all(url in pages or "abc7chicago.com/archive" in url or "9gag.com" in url for url, _ in extra)


def test_real_2014_plain_wat(shared_data: Path, tmp_path: Path) -> None:
    stats = extract_wat(str(shared_data / TRIPLE), str(tmp_path / "t.parquet"), CONFIG)
    assert stats.extra["img_links"] == 4  # MANIFEST: 4 IMG links, all with alt
    assert stats.counts["kept"] + stats.counts["drop:alt_too_short"] == 4
    assert_every_img_link_accounted(stats)


def test_real_2023_lf_record_without_alt(shared_data: Path, tmp_path: Path) -> None:
    # Hand-cut 2023 record with LF line endings: read in quirks mode; 27 IMG links, none with alt.
    stats = extract_wat(str(shared_data / SINGLE_2023), str(tmp_path / "s.parquet"), CONFIG)
    assert dict(stats.counts) == {"drop:no_alt": 27}


def test_real_2024_wat_without_links_writes_empty_shard(shared_data: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "w.parquet")
    stats = extract_wat(str(shared_data / WHIRLWIND), out, CONFIG)
    assert stats.total == 0 and stats.extra["metadata_records"] == 1
    table = pq.read_table(out)
    assert table.num_rows == 0 and set(COLUMNS) <= set(table.column_names)


# --- the real broken files in ../shared/data/bad ---------------------------------------------


def test_bad_lf_line_endings_still_extracts(shared_data: Path, tmp_path: Path) -> None:
    stats = extract_wat(
        str(shared_data / "bad/cc-2016-40_head500.lf-line-endings.warc.wat"), str(tmp_path / "lf.parquet"), CONFIG
    )
    # Same JSON bodies as the head500 file; the overshooting warcinfo Content-Length swallows the
    # first metadata record (it describes the crawl's warcinfo and has no links).
    assert stats.counts["kept"] == 757
    assert stats.extra["metadata_records"] == 499


@pytest.mark.parametrize(
    ("name", "expected_bad"),
    [
        ("priyanlc_CC-MAIN-sample.warc.wat.gz", {"bad:truncated_json": 1}),
        ("priyanlc_CC-MAIN-sample3.warc.wat.gz", {"bad:truncated_json": 1}),
    ],
)
def test_bad_real_truncated_records_are_counted(
    shared_data: Path, tmp_path: Path, name: str, expected_bad: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "bad.parquet"
    stats = extract_wat(str(shared_data / "bad" / name), str(out), CONFIG)
    assert {k: v for k, v in stats.counts.items() if k.startswith("bad:")} == expected_bad
    assert out.exists()
    reason = next(iter(expected_bad))[4:]
    assert any(name in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def test_real_record_with_a_wrong_content_length_loses_nothing(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """linkrun's hand-edited record claims 7605 bytes but ends early: its Content-Length runs into
    the next record, which is read again rather than lost inside the liar's body."""
    path = shared_data / "bad" / "linkrun_testcase2.wat"
    stats = extract_wat(str(path), str(tmp_path / "l.parquet"), CONFIG)
    assert stats.extra["records_with_wrong_content_length"] == 1
    assert not {k for k in stats.counts if k.startswith("bad:")}
    # fastwarc sees 5 metadata records; the one inside the liar's body is read too.
    assert stats.extra["records_read"] - stats.extra["warcinfo_records"] == 5
    assert stats.extra["metadata_records"] == 6
    assert any("runs into the next record" in r.getMessage() for r in caplog.records)


def test_bad_real_clipped_warc_is_not_a_wat(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "clipped.parquet"
    with pytest.raises(StageError, match="resiliparse_clipped.warc.gz"):
        extract_wat(str(shared_data / "bad/resiliparse_clipped.warc.gz"), str(out), CONFIG)
    assert not out.exists()


# --- the fixture writer ----------------------------------------------------------------------

PAGES = [
    FixturePage(
        url="http://example.com/a/page1.html",
        date="2024-02-20T10:00:00Z",
        images=[
            ("/img/one.jpg", "A red circle on white"),
            ("two.png", "  A   blue\n square\t "),
            ("//cdn.example.net/three.webp", "Three green triangles"),
            ("http://other.org/four.jpg", None),
            ("http://other.org/five.jpg", ""),
            ("http://other.org/six.jpg", "logo"),
            ("/img/one.jpg", "A red circle on white"),
        ],
    ),
    FixturePage(
        url="http://example.com/b/page2.html",
        date="2024-02-20T10:00:01Z",
        base="/static/",
        images=[("rel/seven.jpg", "Seven yellow stripes"), ("../eight.jpg", "Eight purple dots")],
    ),
]


def test_write_wat_is_real_wat_format(tmp_path: Path) -> None:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    path = tmp_path / "fixture.warc.wat.gz"
    write_wat(path, PAGES)
    raw = path.read_bytes()
    # one gzip member per record
    members, data = 0, raw
    import zlib

    while data:
        d = zlib.decompressobj(31)
        d.decompress(data)
        assert d.eof
        data, members = d.unused_data, members + 1
    assert members == 1 + len(PAGES)
    plain = gzip.decompress(raw)
    assert plain.startswith(b"WARC/1.0\r\nWARC-Type: warcinfo\r\n")
    records = list(ArchiveIterator(io.BytesIO(raw), parse_http=False))  # strict mode (quirks off)
    assert [str(r.record_type) for r in records] == ["warcinfo", "metadata", "metadata"]
    for record, page in zip(
        ArchiveIterator(io.BytesIO(raw), record_types=WarcRecordType.metadata, parse_http=False), PAGES
    ):
        assert record.headers["WARC-Target-URI"] == page.url
        assert record.headers["Content-Type"] == "application/json"
        body = record.reader.read()
        assert len(body) == record.content_length
        doc = orjson.loads(body)
        assert doc["Envelope"]["WARC-Header-Metadata"]["WARC-Target-URI"] == page.url
        meta = doc["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]
        imgs = [link for link in meta["Links"] if link["path"] == "IMG@/src"]
        assert [(link["url"], link.get("alt")) for link in imgs] == page.images
        assert any(link["path"] == "A@/href" for link in meta["Links"])
        assert meta["Head"].get("Base") == page.base
    # deterministic bytes
    write_wat(tmp_path / "again" / path.name, PAGES)
    assert (tmp_path / "again" / path.name).read_bytes() == raw


@pytest.mark.parametrize("name,per_record", [("f.warc.wat.gz", True), ("f.warc.wat.gz", False), ("f.warc.wat", False)])
def test_extract_reads_what_write_wat_writes(tmp_path: Path, name: str, per_record: bool) -> None:
    path = tmp_path / name
    write_wat(path, PAGES, gzip_per_record=per_record)
    out = str(tmp_path / "out.parquet")
    stats = extract_wat(str(path), out, CONFIG)
    rows = read_rows(out)
    got = {(r["url"], r["alt"]) for r in rows}
    assert got == {
        ("http://example.com/img/one.jpg", "A red circle on white"),
        ("http://example.com/a/two.png", "A blue square"),
        ("http://cdn.example.net/three.webp", "Three green triangles"),
        ("http://example.com/static/rel/seven.jpg", "Seven yellow stripes"),
        ("http://example.com/eight.jpg", "Eight purple dots"),
    }
    assert dict(stats.counts) == {"kept": 5, "drop:no_alt": 2, "drop:alt_too_short": 1, "drop:duplicate": 1}
    assert_every_img_link_accounted(stats)
    by_url = {r["url"]: r for r in rows}
    assert by_url["http://example.com/eight.jpg"]["page_url"] == "http://example.com/b/page2.html"
    assert by_url["http://example.com/eight.jpg"]["record_date"] == "2024-02-20T10:00:01Z"


def test_config_thresholds(tmp_path: Path) -> None:
    path = tmp_path / "f.warc.wat.gz"
    write_wat(path, PAGES)
    config = ExtractConfig(min_alt_length=4, max_alt_length=15, max_url_length=30, allowed_schemes=["https"])
    stats = extract_wat(str(path), str(tmp_path / "o.parquet"), config)
    # "logo" passes min 4; every URL is http:// so all pass the alt filters and die on the scheme
    assert stats.counts["kept"] == 0
    assert stats.counts["drop:alt_too_long"] == 5  # the four long alts (one twice) and "Seven yellow stripes"
    assert stats.counts["drop:bad_scheme"] == 2  # "A blue square", "logo"
    assert_every_img_link_accounted(stats)
    https_page = FixturePage("https://s.org/p", "2024-01-01T00:00:00Z", [("https://s.org/a.jpg", "an https image"),
                             ("http://s.org/b.jpg", "an http image"), ("/c.jpg", "a relative https image")])
    write_wat(path, [https_page])
    out = str(tmp_path / "h.parquet")
    stats = extract_wat(str(path), out, ExtractConfig(allowed_schemes=["https"]))
    assert {r["url"] for r in read_rows(out)} == {"https://s.org/a.jpg", "https://s.org/c.jpg"}
    assert stats.counts["drop:bad_scheme"] == 1


# --- relative URL resolution -----------------------------------------------------------------

RESOLVE_CASES = [
    ("http://a.com/b/c/page.html", "/x.jpg", "http://a.com/x.jpg"),
    ("http://a.com/b/c/page.html", "x.jpg", "http://a.com/b/c/x.jpg"),
    ("http://a.com/b/c/page.html", "../x.jpg", "http://a.com/b/x.jpg"),
    ("http://a.com/b/c/page.html", "//cdn.b.org/x.jpg", "http://cdn.b.org/x.jpg"),
    ("https://a.com:8443/b/", "/x.jpg?w=1#f", "https://a.com:8443/x.jpg?w=1#f"),
    ("http://a.com/b/", "/./x/../y.jpg", "http://a.com/y.jpg"),
    ("http://a.com/b/?q=1", "?p=2", "http://a.com/b/?p=2"),
    ("http://a.com/b/", "/x.jpg?", "http://a.com/x.jpg"),
]


@pytest.mark.parametrize(("base", "ref", "expected"), RESOLVE_CASES)
def test_resolver_matches_urljoin(base: str, ref: str, expected: str) -> None:
    assert _Resolver(base).resolve(ref) == urljoin(base, ref) == expected


def test_resolver_matches_urljoin_on_random_refs() -> None:
    rng = random.Random(7)
    pieces = ["/", "//", "a", "b.jpg", ".", "..", "?", "#", ";", "x=1", "%20", "h.org", ":", "[", "]", "\t", "\n", "@", " "]
    pieces += ["\x01", "é", "²", "ｈ", "℀", "A:", "-", "~", "?#"]
    bases = ["http://h.com/p/q.html", "https://u:p@h.com:81/p/", "http://h.com", "http://h.com/p/q?z#y", "http://[::1]:8/x/"]
    bases += ["http://h.com?q", "http://h.com//p/q", "http://h.com/p/./q/", "http://h.com/p;x/q;y", "http://h.com/a:b/c"]
    for _ in range(40000):
        ref = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 7)))
        base = rng.choice(bases)
        try:
            expected = urljoin(base, ref)
        except ValueError:
            expected = ""
        assert _Resolver(base).resolve(ref) == expected, (base, ref)


def test_relative_urls_against_base_and_target_uri(tmp_path: Path) -> None:
    pages = [
        FixturePage("http://site.org/dir/page.html", "2024-01-01T00:00:00Z", [("img/a.jpg", "relative to page")]),
        FixturePage(
            "http://site.org/dir/page2.html",
            "2024-01-01T00:00:01Z",
            [("img/b.jpg", "relative to the base")],
            base="https://static.site.org/assets/",
        ),
        FixturePage(
            "http://site.org/dir/sub/page3.html",
            "2024-01-01T00:00:02Z",
            [("c.jpg", "relative to a relative base")],
            base="../media/",
        ),
        FixturePage(
            "http://site.org/p4.html",
            "2024-01-01T00:00:03Z",
            [
                ("data:image/png;base64,AAAA", "an inline data image"),
                ("javascript:void(0)", "a javascript link"),
                ("mailto:x@site.org", "a mail link"),
                ("ftp://site.org/x.jpg", "an ftp image"),
                ("http://[::1/x.jpg", "a broken ipv6 host"),
                ("   ", "an empty src"),
                ("http://site.org/" + "x" * 3000 + ".jpg", "a very long URL"),
            ],
        ),
    ]
    path = tmp_path / "rel.warc.wat.gz"
    write_wat(path, pages)
    out = str(tmp_path / "rel.parquet")
    stats = extract_wat(str(path), out, CONFIG)
    assert {r["url"] for r in read_rows(out)} == {
        "http://site.org/dir/img/a.jpg",
        "https://static.site.org/assets/img/b.jpg",
        "http://site.org/dir/media/c.jpg",
    }
    assert stats.counts["drop:bad_scheme"] == 4
    assert stats.counts["drop:invalid_url"] == 1
    assert stats.counts["drop:no_url"] == 1
    assert stats.counts["drop:url_too_long"] == 1
    assert_every_img_link_accounted(stats)


# --- generated bad input ---------------------------------------------------------------------


def _metadata_record(body: bytes, url: str = "http://bad.example/page.html", n: int = 0) -> bytes:
    return warc_record(
        [
            ("WARC-Type", "metadata"),
            ("WARC-Target-URI", url),
            ("WARC-Date", "2024-03-01T00:00:00Z"),
            ("WARC-Record-ID", f"<urn:uuid:00000000-0000-4000-8000-{n:012d}>"),
            ("Content-Type", "application/json"),
        ],
        body,
    )


def _envelope_body(links: list[dict], *, with_links_key: bool = True) -> bytes:
    meta: dict = {"Head": {"Title": "t"}}
    if with_links_key:
        meta["Links"] = links
    return orjson.dumps(
        {
            "Envelope": {
                "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": "http://bad.example/page.html"},
                "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": meta}},
            }
        }
    )


def _gz(records: list[bytes]) -> bytes:
    return b"".join(gzip.compress(r, mtime=0) for r in records)


GOOD_PAGES = [
    FixturePage(f"http://good.example/p{i}.html", "2024-03-01T00:00:00Z", [(f"/i{i}.jpg", f"good picture number {i}")])
    for i in range(6)
]


def test_generated_bad_records_are_counted_and_good_ones_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = wat_records(GOOD_PAGES, "mixed.warc.wat.gz")
    img = {"path": "IMG@/src", "url": "http://bad.example/x.jpg", "alt": "a perfectly fine alt"}
    valid = _envelope_body([img])
    bad_records = [
        _metadata_record(valid[: len(valid) - 12], n=1),  # cut mid-JSON, Content-Length consistent
        _metadata_record(b'{"Envelope": {"IMG@/src" oops}', n=2),  # invalid JSON
        _metadata_record(valid.replace(b"perfectly", b"perfect\xff\xfely"), n=3),  # not UTF-8
        _metadata_record(orjson.dumps({"Envelope": {"Payload-Metadata": {"note": "IMG@/src"}}}), n=4),  # no Links
        _metadata_record(_envelope_body([], with_links_key=False), n=5),  # HTML without Links, no images: fine
        _metadata_record(_envelope_body([{**img, "alt": "huge " * 200_000}, {**img, "alt": "kept next to huge"}]), n=6),
        _metadata_record(_envelope_body([7, None, img | {"alt": 12}, img | {"url": None}]), n=7),  # malformed links
    ]
    records = good[:3] + bad_records + good[3:]
    path = tmp_path / "mixed.warc.wat.gz"
    path.write_bytes(_gz(records))
    out = str(tmp_path / "mixed.parquet")
    stats = extract_wat(str(path), out, CONFIG)
    bad = {k: v for k, v in stats.counts.items() if k.startswith("bad:")}
    assert bad == {"bad:truncated_json": 1, "bad:invalid_json": 1, "bad:non_utf8": 1, "bad:missing_links": 1}
    assert stats.counts["drop:alt_too_long"] == 1
    assert stats.counts["drop:no_alt"] == 1  # alt 12 is not text
    assert stats.counts["drop:no_url"] == 1
    urls = {r["url"] for r in read_rows(out)}
    assert {f"http://good.example/i{i}.jpg" for i in range(6)} <= urls
    assert "http://bad.example/x.jpg" in urls  # "kept next to huge"
    assert stats.counts["kept"] == 7
    assert_every_img_link_accounted(stats)
    messages = [r.getMessage() for r in caplog.records]
    assert any("non_utf8" in m and "00000000-0000-4000-8000-000000000003" in m for m in messages)
    assert any("bad records:" in m and str(path) in m for m in messages)


@pytest.mark.parametrize("cut", ["mid_body", "in_header", "gzip_header"])
def test_truncated_gzip_keeps_good_records(tmp_path: Path, cut: str) -> None:
    src = tmp_path / "full.warc.wat.gz"
    write_wat(src, GOOD_PAGES)
    data = src.read_bytes()
    last = gzip.compress(wat_records(GOOD_PAGES, src.name)[-1], compresslevel=6, mtime=0)
    start = len(data) - len(last)
    assert data[start:] == last
    keep = {"mid_body": start + len(last) * 2 // 3, "in_header": start + 40, "gzip_header": start + 5}[cut]
    path = tmp_path / "cut.warc.wat.gz"
    path.write_bytes(data[:keep])
    out = str(tmp_path / "cut.parquet")
    stats = extract_wat(str(path), out, CONFIG)
    assert stats.counts["kept"] == 5
    assert {r["url"] for r in read_rows(out)} == {f"http://good.example/i{i}.jpg" for i in range(5)}
    bad = {k for k in stats.counts if k.startswith("bad:")}
    assert bad & {"bad:truncated_record", "bad:truncated_gzip"}
    assert stats.extra["stream_end"] in ("truncated_gzip", "complete")
    if cut == "gzip_header":
        assert stats.extra["stream_end"] == "truncated_gzip"


def test_truncated_plain_wat_counts_the_cut_record(tmp_path: Path) -> None:
    data = b"".join(wat_records(GOOD_PAGES, "p.warc.wat"))
    path = tmp_path / "p.warc.wat"
    path.write_bytes(data[: len(data) - 200])
    stats = extract_wat(str(path), str(tmp_path / "p.parquet"), CONFIG)
    assert stats.counts["kept"] == 5 and stats.counts["bad:truncated_record"] == 1


def test_garbage_after_good_records(tmp_path: Path) -> None:
    path = tmp_path / "g.warc.wat.gz"
    write_wat(path, GOOD_PAGES)
    path.write_bytes(path.read_bytes() + b"\x1f\x8b\x08\x00" + bytes(random.Random(1).randbytes(3000)))
    stats = extract_wat(str(path), str(tmp_path / "g.parquet"), CONFIG)
    assert stats.counts["kept"] == 6
    assert stats.counts["bad:corrupt_gzip"] == 1


@pytest.mark.parametrize(
    "content",
    [b"", b"this is a text file, not a WARC\n", bytes(random.Random(3).randbytes(20_000)), b"\x1f\x8b\x08\x00broken"],
)
def test_unreadable_files_raise_stage_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "not-a-wat.warc.wat.gz"
    path.write_bytes(content)
    out = tmp_path / "o.parquet"
    with pytest.raises(StageError, match="not-a-wat.warc.wat.gz"):
        extract_wat(str(path), str(out), CONFIG)
    assert not out.exists()


def test_missing_file_raises_stage_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="nowhere.warc.wat.gz"):
        extract_wat(str(tmp_path / "nowhere.warc.wat.gz"), str(tmp_path / "o.parquet"), CONFIG)


# --- S3 and HTTP input -----------------------------------------------------------------------


def test_s3_input_and_output(s3_root: str, tmp_path: Path) -> None:
    path = tmp_path / "s3.warc.wat.gz"
    write_wat(path, PAGES)
    wat_uri = storage.join(s3_root, "crawl/s3.warc.wat.gz")
    storage.write_bytes(wat_uri, path.read_bytes())
    out = storage.join(s3_root, "candidates/s3.parquet")
    stats = extract_wat(wat_uri, out, CONFIG)
    assert stats.counts["kept"] == 5 and stats.output_uri == out
    rows = read_rows(out)
    assert len(rows) == 5 and rows[0]["wat_file"] == wat_uri
    with pytest.raises(StageError, match="missing.warc.wat.gz"):
        extract_wat(storage.join(s3_root, "missing.warc.wat.gz"), storage.join(s3_root, "x.parquet"), CONFIG)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _CutHandler(_QuietHandler):
    """Announces the full length, sends half, closes: a connection dropped mid-download."""

    def do_GET(self) -> None:  # noqa: N802
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def http_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = getattr(request, "param", _QuietHandler)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_http_input(http_dir: tuple[str, Path], tmp_path: Path, shared_data: Path) -> None:
    base, root = http_dir
    (root / "head500.warc.wat.gz").write_bytes((shared_data / HEAD500).read_bytes())
    stats = extract_wat(f"{base}/head500.warc.wat.gz", str(tmp_path / "h.parquet"), CONFIG)
    assert stats.counts["kept"] == 757
    with pytest.raises(StageError, match="absent.warc.wat.gz"):
        extract_wat(f"{base}/absent.warc.wat.gz", str(tmp_path / "a.parquet"), CONFIG)


@pytest.mark.parametrize("http_dir", [_CutHandler], indirect=True)
def test_http_connection_dropped_fails_the_task(http_dir: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_dir
    write_wat(root / "cut.warc.wat.gz", GOOD_PAGES * 50)
    out = tmp_path / "c.parquet"
    with pytest.raises(StageError, match="cut.warc.wat.gz"):
        extract_wat(f"{base}/cut.warc.wat.gz", str(out), CONFIG)
    assert not out.exists()


# --- listing a crawl's WAT files -------------------------------------------------------------


def _paths_file(tmp_path: Path, crawl: str, n: int) -> Path:
    rel = [f"crawl-data/{crawl}/segments/17000000{i:02d}.5/wat/{crawl}-{i:05d}.warc.wat.gz" for i in range(n)]
    path = tmp_path / "crawl-data" / crawl / "wat.paths.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress("\n".join(rel).encode() + b"\n"))
    return path


def test_list_wat_files_first_n_and_sample(tmp_path: Path) -> None:
    crawl = "CC-MAIN-2024-10"
    paths = _paths_file(tmp_path, crawl, 40)
    every = list_wat_files(crawl, CONFIG, paths_uri=str(paths))
    assert len(every) == 40
    assert every[0] == f"https://data.commoncrawl.org/crawl-data/{crawl}/segments/1700000000.5/wat/{crawl}-00000.warc.wat.gz"
    assert list_wat_files(crawl, ExtractConfig(max_wat_files=3), str(paths)) == every[:3]
    sample = list_wat_files(crawl, ExtractConfig(sample_wat_files=5), str(paths))
    assert len(sample) == 5 and sample == sorted(sample, key=every.index)
    assert sample == list_wat_files(crawl, ExtractConfig(sample_wat_files=5), str(paths))
    other_seeds = {tuple(list_wat_files(crawl, ExtractConfig(sample_wat_files=5, sample_seed=s), str(paths))) for s in range(1, 6)}
    assert any(s != tuple(sample) for s in other_seeds)
    assert list_wat_files(crawl, ExtractConfig(sample_wat_files=5, max_wat_files=2), str(paths)) == sample[:2]
    assert list_wat_files(crawl, ExtractConfig(sample_wat_files=100), str(paths)) == every


def test_list_wat_files_from_cc_base_url(tmp_path: Path) -> None:
    crawl = "CC-MAIN-2000-01"
    _paths_file(tmp_path, crawl, 2)
    uris = list_wat_files(crawl, ExtractConfig(cc_base_url=str(tmp_path) + "/"))
    assert uris[1] == f"{tmp_path}/crawl-data/{crawl}/segments/1700000001.5/wat/{crawl}-00001.warc.wat.gz"
    with pytest.raises(StageError, match="CC-MAIN-2000-02"):
        list_wat_files("CC-MAIN-2000-02", ExtractConfig(cc_base_url=str(tmp_path) + "/"))


@pytest.mark.parametrize("bad_id", ["CC-MAIN-24-10", "cc-main-2024-10", "CC-MAIN-2024-1", "CC-MAIN-2024-99", "2024-10"])
def test_list_wat_files_rejects_bad_crawl_id(bad_id: str) -> None:
    with pytest.raises(ValueError, match="CC-MAIN-YYYY-WW"):
        list_wat_files(bad_id, CONFIG, paths_uri="/unused")


# --- CLI -------------------------------------------------------------------------------------


def test_cli_extract_and_list_wats(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from laion_tasks.cli import app

    path = tmp_path / "c.warc.wat.gz"
    write_wat(path, PAGES)
    runner = CliRunner()
    result = runner.invoke(app, ["extract", str(path), str(tmp_path / "c.parquet")])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout[result.stdout.index("{") :])
    assert stats["counts"]["kept"] == 5
    paths = _paths_file(tmp_path, "CC-MAIN-2024-10", 10)
    result = runner.invoke(app, ["list-wats", "--snapshot", "CC-MAIN-2024-10", "--paths-uri", str(paths), "--max", "2"])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stdout.splitlines() if line.startswith("https://")][1].endswith("-00001.warc.wat.gz")
    result = runner.invoke(app, ["extract", str(tmp_path / "none.wat"), str(tmp_path / "n.parquet")])
    assert result.exit_code == 2 and "none.wat" in result.output
