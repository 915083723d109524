"""Extract one WAT file: walk its records, turn each image link into a candidate row or a drop
reason, and write the rows (the per-file core of the stage)."""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import compress
from typing import Any
from urllib.parse import urljoin

import orjson

from laion_tasks import storage
from laion_tasks.config import ExtractConfig
from laion_tasks.stage import ShardStats, StageError
from laion_tasks.stages.extract.links import (
    _ALT_OF,
    _PATH_OF,
    _URL_OF,
    MAX_LOGGED_BAD_RECORDS,
    _Resolver,
    _valid_url,
    candidate_uid,
)
from laion_tasks.stages.extract.warc import RECORD_END, _resync_point, _StreamReader
from laion_tasks.stages.extract.wat import IMG_MARKER, IMG_PATH, _as_link, _fast_links, _Link

log = logging.getLogger(__name__)


@dataclass
class _Rows:
    uid: list[str] = field(default_factory=list)
    url: list[str] = field(default_factory=list)
    alt: list[str] = field(default_factory=list)
    page_url: list[str] = field(default_factory=list)
    record_date: list[str | None] = field(default_factory=list)
    record_id: list[str | None] = field(default_factory=list)


class _Extractor:
    """The per-file state of one extraction: counters, dedup set and output columns."""

    def __init__(self, wat_uri: str, config: ExtractConfig) -> None:
        self.wat_uri = wat_uri
        self.config = config
        self.allowed_schemes = frozenset(s.lower() for s in config.allowed_schemes)
        self.seen: set[tuple[str, str]] = set()
        self.rows = _Rows()
        self.outcomes: dict[str, int] = {}
        """``bad:<reason>`` counts; link outcomes go to ``drops`` (cheaper to update), merged at the end."""
        self.drops: defaultdict[str, int] = defaultdict(int)
        self.info = {
            "records_read": 0,
            "warcinfo_records": 0,
            "metadata_records": 0,
            "records_without_img_links": 0,
            "records_with_img_links": 0,
            "records_with_kept_links": 0,
            "img_links": 0,
            "records_with_wrong_content_length": 0,
        }
        self.bad_logged = 0

    def bad(self, reason: str, record: Any, detail: str) -> None:
        key = f"bad:{reason}"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        if self.bad_logged < MAX_LOGGED_BAD_RECORDS:
            rid = record.record_id if record is not None else None
            pos = record.stream_pos if record is not None else "?"
            log.warning("%s: bad record %s at byte %s: %s: %s", self.wat_uri, rid, pos, reason, detail)
        elif self.bad_logged == MAX_LOGGED_BAD_RECORDS:
            log.warning("%s: more bad records; only the counts are reported from here on", self.wat_uri)
        self.bad_logged += 1

    def record(self, record: Any) -> None:
        """Handle one metadata record."""
        self.info["metadata_records"] += 1
        self.handle(record, record.reader.read())

    def handle(self, record: Any, body: bytes, swallowed: bool = False) -> None:
        """Check one record's framing, then extract its body's links."""
        if not body and record.headers.get("Content-Length") is None:
            self.bad("truncated_record", record, "no Content-Length: the record header is cut")
            return
        at = body.find(RECORD_END)
        if at >= 0 and body[at + 4 : at + 9] and b"WARC/".startswith(body[at + 4 : at + 9]):
            # JSON bodies hold no CRLF: a blank line then a WARC header is where the record really
            # ended, and its Content-Length claimed the records after it. Those are read again.
            self.info["records_with_wrong_content_length"] += 1
            log.warning("%s: record %s at byte %s: Content-Length %s runs into the next record",
                        self.wat_uri, record.record_id, record.stream_pos, record.content_length)  # fmt: skip
            self.swallowed(body[at + 4 :])
            body = body[:at]
        elif len(body) < record.content_length:
            reason = "cut_by_wrong_content_length" if swallowed else "truncated_record"
            self.bad(reason, record, f"body has {len(body)} of {record.content_length} bytes")
            return
        self.body(record, body)

    def swallowed(self, data: bytes) -> None:
        """The records a wrong Content-Length swallowed; the last, cut where that length ended,
        gets ``bad:cut_by_wrong_content_length``."""
        from fastwarc.warc import ArchiveIterator, WarcRecordType

        try:
            found = 0
            for inner in ArchiveIterator(io.BytesIO(data), record_types=WarcRecordType.metadata, parse_http=False, quirks_mode=True):
                found += 1
                self.info["metadata_records"] += 1
                self.handle(inner, inner.reader.read(), swallowed=True)
        except Exception as exc:  # noqa: BLE001 - fastwarc cannot parse what is left of a record
            self.bad("cut_by_wrong_content_length", None, f"{type(exc).__name__}: {exc}")
            return
        if not found:  # only the start of the next record's header was swallowed
            self.info["metadata_records"] += 1
            self.bad("cut_by_wrong_content_length", None, f"{len(data)} bytes of a record header")

    def body(self, record: Any, body: bytes) -> None:
        """Extract the links of one metadata record's body."""
        info = self.info
        if IMG_MARKER not in body:
            info["records_without_img_links"] += 1
            return
        fast = _fast_links(body)
        if fast is not None:
            links, base = fast
        else:
            parsed = self.parse_slow(body, record)
            if parsed is None:
                return
            links, base = parsed
        info["records_with_img_links"] += 1
        headers = record.headers
        page_url = headers.get("WARC-Target-URI") or ""
        base_url = page_url
        if isinstance(base, str) and base.strip():
            try:
                base_url = urljoin(page_url, base.strip())
            except ValueError:
                pass  # an unparsable <base href> is ignored, as browsers do
        if self.links(links, page_url, base_url, headers.get("WARC-Date"), record.record_id):
            info["records_with_kept_links"] += 1

    def parse_slow(self, body: bytes, record: Any) -> tuple[list[_Link], Any] | None:
        """orjson parse of a record the fast decoder rejected: (Links, Head.Base), or None if bad."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as uexc:
                self.bad("non_utf8", record, str(uexc))
                return
            reason = "truncated_json" if "unexpected end of data" in str(exc) else "invalid_json"
            self.bad(reason, record, str(exc))
            return
        try:
            html_meta = doc["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]
            links = html_meta["Links"]
        except (KeyError, TypeError) as exc:
            self.bad("missing_links", record, f"no Envelope...HTML-Metadata.Links ({type(exc).__name__}: {exc})")
            return
        if not isinstance(links, list):
            self.bad("missing_links", record, f"Links is a {type(links).__name__}, not a list")
            return None
        head = html_meta.get("Head")
        base = head.get("Base") if isinstance(head, dict) else None
        return [_as_link(entry) for entry in links], base

    def links(self, links: list[_Link], page_url: str, base_url: str, date: str | None, record_id: str | None) -> int:
        """Classify every IMG@/src link of one page; returns how many were kept."""
        paths = list(map(_PATH_OF, links))  # C-level; IMG links are a minority of all links
        images = []
        index = -1
        for _ in range(paths.count(IMG_PATH)):
            index = paths.index(IMG_PATH, index + 1)
            images.append(links[index])
        self.info["img_links"] += len(images)
        if not images:
            return 0
        alts = list(map(_ALT_OF, images))
        with_alt = list(compress(images, alts))  # C-level: most IMG links have no alt
        alts = list(filter(None, alts))
        no_alt = len(images) - len(alts)
        if not alts:
            self.drops["drop:no_alt"] += no_alt
            return 0
        try:  # whitespace normalisation in C; a non-string alt (never seen in real WATs) takes the loop
            alts = list(map(" ".join, map(str.split, alts)))
        except TypeError:
            alts = [" ".join(alt.split()) if type(alt) is str else "" for alt in alts]
        config = self.config
        min_alt, max_alt, max_url = config.min_alt_length, config.max_alt_length, config.max_url_length
        allowed = self.allowed_schemes
        http_ok, https_ok = "http" in allowed, "https" in allowed
        drops = self.drops
        seen = self.seen
        rows = self.rows
        resolver: _Resolver | None = None
        kept = 0
        min_alt = max(min_alt, 1)  # an empty alt is always no_alt, never alt_too_short
        for url, alt in zip(map(_URL_OF, with_alt), alts):
            if len(alt) < min_alt:
                if not alt:
                    no_alt += 1
                    continue
                reason = "drop:alt_too_short"
            elif len(alt) > max_alt:
                reason = "drop:alt_too_long"
            elif type(url) is not str or not (url := url.strip()):
                reason = "drop:no_url"
            else:
                if url.startswith("https://"):
                    scheme_ok = https_ok
                elif url.startswith("http://"):
                    scheme_ok = http_ok
                else:
                    if resolver is None:
                        resolver = _Resolver(base_url)
                    url = resolver.resolve(url)
                    scheme, sep, _ = url.partition(":")
                    scheme_ok = None if not sep or "/" in scheme else scheme.lower() in allowed
                if scheme_ok is None:
                    reason = "drop:unresolvable_url"
                elif not scheme_ok:
                    reason = "drop:bad_scheme"
                elif len(url) > max_url:
                    reason = "drop:url_too_long"
                elif (url, alt) in seen:
                    reason = "drop:duplicate"
                elif not _valid_url(url):
                    reason = "drop:invalid_url"
                else:
                    seen.add((url, alt))
                    rows.uid.append(candidate_uid(url, alt))
                    rows.url.append(url)
                    rows.alt.append(alt)
                    rows.page_url.append(page_url)
                    rows.record_date.append(date)
                    rows.record_id.append(record_id)
                    kept += 1
                    continue
            drops[reason] += 1
        drops["drop:no_alt"] += no_alt
        drops["kept"] += kept
        return kept


MAX_LISTED_SPANS = 100
"""Per file, the damaged byte spans listed in ``extra["damaged_spans"]``; all are counted."""


def _scan(extractor: _Extractor, reader: _StreamReader) -> str:
    """Run fastwarc over the stream; returns how the stream ended ("complete" or a reason).

    A damaged gzip member (or a record fastwarc cannot parse) does not end the file: its
    span is counted as ``bad:corrupt_gzip`` (``bad:invalid_warc``), listed in
    ``extra["damaged_spans"]``, and reading goes on at the next gzip member holding a WARC
    record (see :func:`_resync_point`).
    """
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    metadata = WarcRecordType.metadata
    info = extractor.info
    last = None
    start, after_good = 0, False
    while True:
        # quirks_mode reads records with LF-only line endings (hand-cut and older CC samples).
        iterator = ArchiveIterator(
            reader,
            record_types=WarcRecordType.metadata | WarcRecordType.warcinfo,
            parse_http=False,
            quirks_mode=True,
        )
        try:
            for record in iterator:
                info["records_read"] += 1
                last = record
                if record.record_type == metadata:
                    extractor.record(record)
                else:
                    info["warcinfo_records"] += 1
                start, after_good = record.stream_pos, True
            break
        except Exception as exc:  # fastwarc raises OSError; a PanicException is not an OSError
            if reader.io_error is not None:
                raise StageError(
                    f"extract {extractor.wat_uri}: reading failed at byte {reader.raw_pos}: "
                    f"{type(reader.io_error).__name__}: {reader.io_error}"
                ) from exc
            message = str(exc)
            reason = "corrupt_gzip" if "zip" in message.lower() else "invalid_warc"
            point = _resync_point(reader, start, after_good) if reader.is_gzip else None
            if info["records_read"] == 0 and (point is None or point[1] is None):
                raise StageError(f"extract {extractor.wat_uri}: not a WARC/WAT file: {type(exc).__name__}: {exc}") from exc
            damaged, restart = point if point is not None else (reader.raw_pos, None)
            spans = extractor.info.setdefault("damaged_spans", [])
            if len(spans) < MAX_LISTED_SPANS:
                spans.append([damaged, restart])
            if restart is None:
                extractor.bad(reason, None, f"the rest of the file after byte ~{damaged} is unreadable: {message}")
                return reason
            extractor.bad(reason, None, f"bytes {damaged}-{restart} are unreadable ({message}); reading goes on at {restart}")
            reader.rewind(restart)
            start, after_good = restart, False
    if info["records_read"] == 0:
        raise StageError(
            f"extract {extractor.wat_uri}: no warcinfo/metadata records in {reader.raw_pos} bytes: not a WAT file"
        )
    if reader.is_gzip:
        problem = reader.gzip_tail_problem(last.stream_pos if last is not None else -1)
        if problem:
            extractor.bad("truncated_gzip", None, problem)
            return "truncated_gzip"
    return "complete"


def _write_parquet(extractor: _Extractor, output_uri: str, stats: ShardStats) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = extractor.rows
    n = len(rows.url)
    table = pa.table(
        {
            "uid": pa.array(rows.uid, pa.string()),
            "url": pa.array(rows.url, pa.string()),
            "alt": pa.array(rows.alt, pa.string()),
            "page_url": pa.array(rows.page_url, pa.string()),
            "wat_file": pa.array([extractor.wat_uri] * n, pa.string()),
            "record_date": pa.array(rows.record_date, pa.string()),
            "record_id": pa.array(rows.record_id, pa.string()),
        }
    )
    with storage.atomic_local_path(output_uri, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
        stats.bytes_written = tmp.stat().st_size
        stats.checksum = storage.file_sha256(tmp)
