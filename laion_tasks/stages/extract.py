"""Extract stage: one Common Crawl WAT file -> one Parquet shard of (image URL, alt text) candidates.

Every ``IMG@/src`` link in ``Envelope.Payload-Metadata.HTTP-Response-Metadata.HTML-Metadata.Links``
is accounted for: it is either ``kept`` or dropped with a reason (``drop:no_alt``,
``drop:alt_too_short``, ...). Records that cannot be read are counted as ``bad:<reason>``
and logged with their byte offset; the file's other records are still extracted. A file
that cannot be opened or holds no WARC records raises :class:`StageError`.

Speed: fastwarc skips non-metadata records natively, and a record's JSON is parsed only
when its bytes contain ``"IMG@/src"``. Records without that marker cannot yield an image
link, so they are counted (``records_without_img_links``) without being parsed; their JSON
validity is therefore not checked, which costs nothing in output. The records that are
parsed go through a typed msgspec decoder that materialises only the path to ``Links``
(and ``path``/``url``/``alt`` of each link), about twice as fast as building the whole
document; any record it rejects is parsed again with orjson, whose error classification
(``bad:<reason>``) is then the one reported, so both paths give the same results.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import operator
import random
import re
import zlib
from collections import defaultdict, deque
from dataclasses import dataclass, field
from itertools import compress
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

import msgspec
import orjson

from laion_tasks import layout, storage
from laion_tasks.config import ExtractConfig
from laion_tasks.stage import Context, ShardStats, StageError, StageSpec

log = logging.getLogger(__name__)

IMG_PATH = "IMG@/src"
RECORD_END = b"\r\n\r\n"
"""The blank line after a record; a JSON body holds no CRLF, so inside one it marks an overrun."""
IMG_MARKER = b'"IMG@/src"'
_PATH_OF = operator.attrgetter("path")
_ALT_OF = operator.attrgetter("alt")
_URL_OF = operator.attrgetter("url")
CRAWL_ID_RE = re.compile(r"^CC-MAIN-(\d{4})-(\d{2})$")
COLUMNS = ("uid", "url", "alt", "page_url", "wat_file", "record_date", "record_id")
MAX_LOGGED_BAD_RECORDS = 20
"""Per file, the first N bad records are logged one by one; the rest only in the summary."""
_NEEDS_URLJOIN = re.compile(r"[\[\]\t\r\n]|\?#")
"""In a whole reference, what urljoin would rewrite (empty query, stripped tabs, IPv6 hosts)."""
_PATH_NEEDS_URLJOIN = re.compile(r";|/\.")
"""In the path part, what urljoin would rewrite (dot segments, empty params)."""
_PATH_PART = re.compile(r"[^?#]*")
TAIL_CHECK_BYTES = 8 << 20
"""How much of the raw stream is kept to verify that the last gzip member is complete."""


def candidate_uid(url: str, alt: str) -> str:
    """Stable id of an (url, alt) pair: the first 16 bytes of sha256(url NUL alt), as hex."""
    return hashlib.sha256(f"{url}\x00{alt}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


class _StreamReader:
    """Wraps the raw input for fastwarc: counts bytes, keeps the tail, remembers I/O errors.

    fastwarc needs ``tell()``, which HTTP and S3 bodies lack. I/O errors of the source
    (network, S3) are remembered so they fail the task instead of passing as bad data,
    and the last few MB are kept to check that the final gzip member is complete:
    fastwarc silently ends at a gzip member cut inside its header. The kept tail is also
    what a resync after a damaged gzip member replays from (:meth:`rewind`), so a
    non-seekable source is still read once.
    """

    def __init__(self, raw: IO[bytes], keep: int = TAIL_CHECK_BYTES) -> None:
        self._raw = raw
        self._keep = keep
        self._tail: deque[bytes] = deque()
        self._tail_len = 0
        self._replay = b""
        self.pos = 0
        """Position of the next byte handed to fastwarc (absolute, so record stream_pos are too)."""
        self.raw_pos = 0
        """Bytes read from the source so far."""
        self.eof = False
        self.head = b""
        self.io_error: BaseException | None = None

    def _pull(self, size: int) -> bytes:
        try:
            data = self._raw.read(size) if size is not None and size >= 0 else self._raw.read()
        except Exception as exc:  # noqa: BLE001 - remembered, then re-raised into fastwarc
            self.io_error = exc
            raise
        if not data:
            self.eof = self.eof or size != 0
            return data
        if self.raw_pos == 0:
            self.head = data[:4]
        self.raw_pos += len(data)
        self._tail.append(data)
        self._tail_len += len(data)
        while self._tail_len - len(self._tail[0]) >= self._keep:
            self._tail_len -= len(self._tail.popleft())
        return data

    def read(self, size: int = -1) -> bytes:
        if self._replay:
            n = len(self._replay) if size is None or size < 0 else size
            data, self._replay = self._replay[:n], self._replay[n:]
        else:
            data = self._pull(size)
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if (whence == 0 and offset == self.pos) or (whence == 1 and offset == 0):
            return self.pos
        raise OSError("input stream is not seekable")

    def close(self) -> None:
        """The source is closed by ``storage.open_read``'s context."""

    @property
    def is_gzip(self) -> bool:
        return self.head[:2] == b"\x1f\x8b"

    @property
    def tail_start(self) -> int:
        return self.raw_pos - self._tail_len

    def kept(self, start: int) -> bytes | None:
        """The source bytes from ``start`` to what has been read, or None if no longer kept."""
        if start < self.tail_start or start > self.raw_pos:
            return None
        return b"".join(self._tail)[start - self.tail_start :]

    def fill(self, size: int = 1 << 20) -> bool:
        """Read ahead into the kept tail without handing the bytes out; False at the end of the source."""
        return bool(self._pull(size))

    def rewind(self, position: int) -> None:
        """Hand out the source again from ``position`` (which must still be kept)."""
        data = self.kept(position)
        if data is None:
            raise ValueError(f"byte {position} is no longer kept")
        self._replay, self.pos = data, position

    def gzip_tail_problem(self, member_start: int) -> str | None:
        """Why the gzip members from ``member_start`` to the end are not complete, or None.

        Returns None as well when the check cannot be made (the tail is no longer in
        memory, or ``member_start`` is not a member boundary, as in a single-member file).
        """
        if member_start < self.tail_start or member_start >= self.raw_pos:
            return None
        data = b"".join(self._tail)[member_start - self.tail_start :]
        if data[:2] != b"\x1f\x8b":
            return None
        while data:
            decomp = zlib.decompressobj(31)
            try:
                decomp.decompress(data)
            except zlib.error as exc:
                return f"corrupt gzip member after the last record: {exc}"
            if not decomp.eof:
                return f"the last gzip member ends early ({len(data)} bytes, stream cut)"
            data = decomp.unused_data
        return None


GZIP_MEMBER_MAGIC = b"\x1f\x8b\x08"
RESYNC_CHUNK = 64 * 1024


def _member_end(data: memoryview, start: int) -> int | None:
    """End offset of the gzip member at ``start`` in ``data``; None if it runs past the data.
    Raises zlib.error when the member is damaged (bad deflate data or CRC)."""
    decomp = zlib.decompressobj(31)
    pos = start
    while pos < len(data):
        decomp.decompress(data[pos : pos + RESYNC_CHUNK])
        pos = min(pos + RESYNC_CHUNK, len(data))
        if decomp.eof:
            return pos - len(decomp.unused_data)
    return None


def _starts_warc_member(data: memoryview, start: int) -> bool:
    """Whether a gzip member that decompresses to a WARC record header begins at ``start``."""
    try:
        out = zlib.decompressobj(31).decompress(data[start : start + 4096], 16)
    except zlib.error:
        return False
    return out.startswith(b"WARC/")


def _resync_point(reader: _StreamReader, start: int, after_good: bool) -> tuple[int, int | None] | None:
    """(damaged span start, where the next readable gzip member starts or None) after a read error.

    ``start`` is a member boundary: where the last fully handled record's member starts
    (``after_good``), or where reading (re)started. Members from there are walked with zlib:
    the first one that does not decompress is the damaged one (if it does, the damage is in
    the WARC framing of that member, which is then skipped whole). The next member is then the first later offset that holds
    a gzip header decompressing to ``WARC/``. Common Crawl writes one member per record,
    so this skips exactly the damaged records. None when the kept bytes do not reach back.
    """
    if reader.kept(start) is None:
        return None
    pos, skip, damaged, clean_end = start, after_good, None, None
    while damaged is None:
        data = memoryview(reader.kept(start) or b"")
        try:
            end = _member_end(data, pos - start)
        except zlib.error:
            damaged = pos
            break
        if end is None:  # the member runs past what has been read
            if reader.fill():
                continue
            damaged = pos  # cut at the end of the file
            break
        if not skip:  # a member that decompresses but fastwarc could not parse
            damaged, clean_end = pos, start + end
            break
        skip = False
        pos = start + end
    if clean_end is not None:
        return damaged, clean_end
    search = damaged + 1
    while True:
        base = max(search, reader.tail_start)
        raw = reader.kept(base) or b""
        data = memoryview(raw)
        at = raw.find(GZIP_MEMBER_MAGIC)
        while at >= 0:
            if _starts_warc_member(data, at):
                return damaged, base + at
            at = raw.find(GZIP_MEMBER_MAGIC, at + 1)
        search = base + max(len(raw) - 4096, 0)  # a member header may straddle the read boundary
        if not reader.fill():
            return damaged, None


class _Link(msgspec.Struct, gc=False):
    """One entry of ``Links``; the other keys (text, title, ...) are skipped unmaterialised."""

    path: Any = None
    url: Any = None
    alt: Any = None


class _Head(msgspec.Struct, gc=False):
    Base: Any = None


class _HtmlMeta(msgspec.Struct, gc=False):
    Links: list[_Link] | None = None
    Head: _Head | None = None


class _HttpMeta(msgspec.Struct, gc=False, rename={"html": "HTML-Metadata"}):
    html: _HtmlMeta | None = None


class _PayloadMeta(msgspec.Struct, gc=False, rename={"http": "HTTP-Response-Metadata"}):
    http: _HttpMeta | None = None


class _Envelope(msgspec.Struct, gc=False, rename={"payload": "Payload-Metadata"}):
    payload: _PayloadMeta | None = None


class _WatDoc(msgspec.Struct, gc=False):
    Envelope: _Envelope | None = None


_WAT_DECODER = msgspec.json.Decoder(_WatDoc)


def _fast_links(body: bytes) -> tuple[list[_Link], Any] | None:
    """(Links, Head.Base) of a well-formed record via msgspec, or None to take the orjson path.

    msgspec does not check the UTF-8 of keys and values it skips, so the body is checked
    first (almost free for the ASCII bodies that most records are): a record orjson would
    reject must never pass here.
    """
    try:
        if not body.isascii():
            body.decode("utf-8")
        html_meta = _WAT_DECODER.decode(body).Envelope.payload.http.html  # type: ignore[union-attr]
    except (UnicodeDecodeError, msgspec.DecodeError, AttributeError, RecursionError):
        return None
    if html_meta is None or html_meta.Links is None:
        return None
    return html_meta.Links, html_meta.Head.Base if html_meta.Head is not None else None


def _as_link(entry: Any) -> _Link:
    """A ``Links`` entry from orjson as a _Link; a non-object entry has no path and is skipped."""
    if type(entry) is dict:
        return _Link(path=entry.get("path"), url=entry.get("url"), alt=entry.get("alt"))
    return _Link()


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


def _valid_url(url: str) -> bool:
    """Parsable, with a host: checked once per new pair, so its cost does not matter."""
    try:
        return bool(urlsplit(url).hostname)
    except ValueError:
        return False


class _Resolver:
    """Resolves relative URLs against one page's base URL exactly like ``urljoin``.

    The three common forms (``//host/path``, ``/path`` and ``path`` relative to the base's
    directory, without dot segments, empty query or params) are joined by string
    concatenation, which gives urljoin's result at a fraction of its cost; everything
    else goes through urljoin. Returns "" when the URL cannot be parsed.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.scheme = ""
        self.origin = ""
        self.directory = ""
        if base_url.startswith(("http://", "https://")):
            try:
                parts = urlsplit(base_url)
            except ValueError:
                return
            if parts.netloc:
                self.scheme = parts.scheme
                self.origin = f"{parts.scheme}://{parts.netloc}"
                path = parts.path
                # urljoin drops empty segments and resolves dot segments of the base's directory
                if not _PATH_NEEDS_URLJOIN.search(path) and "//" not in path:
                    self.directory = self.origin + (path[: path.rfind("/") + 1] or "/")

    def resolve(self, url: str) -> str:
        if self.origin and url[-1] not in "?#" and not _NEEDS_URLJOIN.search(url):
            path = _PATH_PART.match(url).group()  # type: ignore[union-attr]
            if not _PATH_NEEDS_URLJOIN.search(path):
                first = url[0]
                if first == "/":
                    if url[1:2] != "/":
                        return self.origin + url
                    if url[2:3] not in ("", "/", "?", "#") and url.isascii():  # urlsplit checks non-ASCII hosts
                        return f"{self.scheme}:{url}"
                elif self.directory and first.isalnum() and ":" not in path and "//" not in path:
                    # not a scheme, no leading control character, no empty segment to drop
                    return self.directory + url
        try:
            return urljoin(self.base_url, url)
        except ValueError:
            return ""


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


def extract_wat(wat_uri: str, output_uri: str, config: ExtractConfig) -> ShardStats:
    """Extract the image-text candidates of one WAT file into one Parquet shard.

    Returns counts of ``kept`` links, ``drop:<reason>`` per filtered link and
    ``bad:<reason>`` per unreadable record; ``extra`` has record counts. Raises
    :class:`StageError` when the file cannot be read at all.
    """
    stats = ShardStats(output_uri=output_uri)
    extractor = _Extractor(wat_uri, config)
    try:
        with storage.open_read(wat_uri) as raw:
            reader = _StreamReader(raw)
            stream_end = _scan(extractor, reader)
    except storage.StorageError as exc:
        raise StageError(f"extract {wat_uri}: cannot read: {exc}") from exc
    for outcome, n in [*extractor.drops.items(), *extractor.outcomes.items()]:
        if n:
            stats.add(outcome, n)
    _write_parquet(extractor, output_uri, stats)
    stats.extra = {**extractor.info, "stream_end": stream_end, "input_bytes": reader.raw_pos}
    bad = {k: v for k, v in stats.counts.items() if k.startswith("bad:")}
    summary = (
        f"extract {wat_uri}: {extractor.info['metadata_records']} metadata records, "
        f"{extractor.info['img_links']} IMG links, {stats.counts.get('kept', 0)} kept -> {output_uri}"
    )
    if bad:
        log.warning("%s; bad records: %s", summary, ", ".join(f"{k[4:]}={v}" for k, v in sorted(bad.items())))
    else:
        log.info(summary)
    return stats.done()


def wat_paths_uri(crawl_id: str, config: ExtractConfig) -> str:
    """Where Common Crawl lists a crawl's WAT files."""
    return f"{config.cc_base_url.rstrip('/')}/crawl-data/{crawl_id}/wat.paths.gz"


def validate_crawl_id(crawl_id: str) -> str:
    match = CRAWL_ID_RE.match(crawl_id)
    if not match or not 1 <= int(match.group(2)) <= 53:
        raise ValueError(f"crawl id {crawl_id!r} is not of the form CC-MAIN-YYYY-WW (for example CC-MAIN-2024-10)")
    return crawl_id


def list_wat_files(crawl_id: str, config: ExtractConfig, paths_uri: str | None = None) -> list[str]:
    """The WAT file URIs of a crawl, from its ``wat.paths.gz`` (or ``paths_uri``).

    Relative paths are prefixed with ``config.cc_base_url``. ``config.sample_wat_files``
    takes a deterministic sample (``sample_seed``) kept in the listing's order; then
    ``config.max_wat_files`` keeps the first N.
    """
    validate_crawl_id(crawl_id)
    uri = paths_uri or wat_paths_uri(crawl_id, config)
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as exc:
        raise StageError(f"list WAT files of {crawl_id}: cannot read {uri}: {exc}") from exc
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise StageError(f"list WAT files of {crawl_id}: {uri} is not a valid gzip file: {exc}") from exc
    try:
        lines = [line.strip() for line in data.decode("utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise StageError(f"list WAT files of {crawl_id}: {uri} is not a text listing: {exc}") from exc
    paths = [line for line in lines if line]
    if not paths:
        raise StageError(f"list WAT files of {crawl_id}: {uri} lists no WAT files")
    base = config.cc_base_url.rstrip("/")
    uris = [p if "://" in p else f"{base}/{p.lstrip('/')}" for p in paths]
    if config.sample_wat_files is not None and config.sample_wat_files < len(uris):
        chosen = sorted(random.Random(config.sample_seed).sample(range(len(uris)), config.sample_wat_files))
        uris = [uris[i] for i in chosen]
    if config.max_wat_files is not None:
        uris = uris[: config.max_wat_files]
    log.info("%s: %d WAT files from %s (%d listed)", crawl_id, len(uris), uri, len(paths))
    return uris


# -- the stage's declaration ---------------------------------------------------------


def _wat_uris(ctx: Context) -> dict[str, str]:
    """wat id -> WAT URI, from the plan's manifest (in crawl order)."""

    def load() -> dict[str, str]:
        uri = layout.wat_manifest_uri(ctx.root, ctx.snapshot)
        wats = storage.read_text(uri).splitlines() if storage.exists(uri) else []
        return {layout.wat_id(w): w for w in wats if w}

    return ctx.resource("wat_manifest", load)


def _plan_extract(ctx: Context) -> list[str]:
    """List the crawl's WAT files (``max_wat_files`` / ``sample_wat_files`` apply here) into the manifest."""
    wats = list_wat_files(ctx.snapshot, ctx.settings.extract, paths_uri=ctx.options.get("wat_paths_uri"))
    storage.write_text(layout.wat_manifest_uri(ctx.root, ctx.snapshot), "".join(f"{w}\n" for w in wats))
    ctx.forget("wat_manifest")
    return list(_wat_uris(ctx))


SPEC = StageSpec(
    name="extract",
    reads=(),
    # max_wat_files, sample_* and cc_base_url choose the WAT files (the plan); each file's URI is its input identity
    result_fields=("extract.min_alt_length", "extract.max_alt_length", "extract.max_url_length", "extract.allowed_schemes"),
    output=lambda ctx, wat: layout.candidates_uri(ctx.root, ctx.snapshot, wat),
    run_shard=lambda ctx, wat: extract_wat(_wat_uris(ctx)[wat], layout.candidates_uri(ctx.root, ctx.snapshot, wat), ctx.settings.extract),
    shards=lambda ctx: list(_wat_uris(ctx)),
    plan=_plan_extract,
    plan_name="wat",
    input_uri=lambda ctx, wat: _wat_uris(ctx)[wat],
    external_inputs=lambda ctx, wat: "wat:" + _wat_uris(ctx)[wat],
)
