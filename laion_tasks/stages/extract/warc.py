"""The WARC side of extract: a gzip-member stream over a WAT file that resynchronises past damage."""

from __future__ import annotations

import logging
import zlib
from collections import deque
from typing import IO



log = logging.getLogger(__name__)

RECORD_END = b"\r\n\r\n"
"""The blank line after a record; a JSON body holds no CRLF, so inside one it marks an overrun."""
TAIL_CHECK_BYTES = 8 << 20
"""How much of the raw stream is kept to verify that the last gzip member is complete."""


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


