"""Opt-outs the download stage honours beyond one response's headers.

* :class:`HostOptOuts`: once an origin opts out host-wide for our agent (robots.txt
  disallows everything, or is unavailable; tdmrep.json reserves every path), its other
  URLs in the shard get the same status without a request.
* :func:`embedded_opt_out`: "no AI training" written into the image itself, read from the
  original bytes before anything is decoded or written:

  - the IPTC PLUS *Data Mining* property (``plus:DataMining`` in XMP, namespace
    ``http://ns.useplus.org/ldf/xmp/1.0/``) with a prohibiting value: any ``DMI-PROHIBITED*``
    value (the vocabulary's every "prohibited" variant, those added later included), and any
    value listed in ``download.embedded_optout_dmi_values``; values compare in any case.
    Every XMP packet is read, wherever it is: as plain text in any format (JPEG APP1, WebP,
    GIF, TIFF, PNG ``iTXt``/``tEXt``), in JPEG *extended* XMP split over several APP1
    segments, in zlib-compressed PNG ``iTXt`` and ``zTXt`` chunks, and in ImageMagick's
    hex-encoded ``Raw profile type xmp`` text chunks. A namespace string outside any packet
    (a decoy) is skipped, and the scan goes on;
  - a C2PA / CAWG training-and-data-mining assertion (``c2pa.training-mining``,
    ``cawg.training-mining``) whose AI-training or data-mining entry says ``notAllowed``
    or ``constrained`` (constraints we cannot check count as a refusal). The manifest is
    read from JPEG APP11, PNG ``caBX`` or WebP ``C2PA`` JUMBF boxes; its signature is not
    verified: a claim to opt out is honoured whoever made it.
"""

from __future__ import annotations

import binascii
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from laion_tasks.net.robots import origin_of

PLUS_NS = b"ns.useplus.org/ldf/xmp/1.0/"
_PLUS_NS_RE = re.compile(re.escape(PLUS_NS), re.I)
_PACKET_OPEN_RE = re.compile(rb"<([\w.-]+):(xmpmeta|xapmeta|RDF)\b")
DMI_PROHIBITED_PREFIX = "DMI-PROHIBITED"
"""Every IPTC PLUS Data Mining value that starts so prohibits (some) data mining: refused, whatever the config."""
XMP_EXTENSION_SIGNATURE = b"http://ns.adobe.com/xmp/extension/\0"
MAX_INFLATED_TEXT = 16 * 1024 * 1024
"""Decompressed PNG text read per image, at most: XMP is kilobytes; a zlib bomb stops here."""
C2PA_TRAINING_LABELS = (b"c2pa.training-mining", b"cawg.training-mining")
C2PA_TRAINING_KEYS = frozenset(
    {
        "c2pa.ai_training",
        "c2pa.ai_generative_training",
        "c2pa.data_mining",
        "cawg.ai_training",
        "cawg.ai_generative_training",
        "cawg.data_mining",
    }
)
C2PA_REFUSALS = frozenset({"notallowed", "constrained"})
STATUS = "opted_out_embedded_metadata"


# -- per-origin short-circuit ---------------------------------------------------------------
@dataclass
class HostOptOuts:
    """Origins that opted out of everything for our agent: (status, reason) each."""

    origins: dict[str, tuple[str, str]] = field(default_factory=dict)
    short_circuited: int = 0
    """URLs answered from here, without a request (for the shard's extra)."""

    def record(self, url: str, status: str, reason: str) -> None:
        self.origins.setdefault(origin_of(url), (status, reason))

    def check(self, url: str) -> tuple[str, str] | None:
        hit = self.origins.get(origin_of(url))
        if hit is not None:
            self.short_circuited += 1
            return hit[0], f"{hit[1]} (whole origin; not requested)"
        return None


# -- XMP: IPTC PLUS Data Mining ---------------------------------------------------------------
def _xmp_packets(data: bytes) -> Iterator[str]:
    """Every XMP packet of ``data`` that declares the PLUS namespace.

    A packet is the nearest ``<x:xmpmeta>`` / ``<x:xapmeta>`` / ``<rdf:RDF>`` element (any prefix)
    that opens before a namespace string, up to its closing tag (or the end of the data, for a
    packet cut short). A namespace string with no packet open before it is skipped: it may be a
    decoy in a comment, and the real packet can come after it.
    """
    opens: list[re.Match[bytes]] | None = None
    pos = 0
    while (ns := _PLUS_NS_RE.search(data, pos)) is not None:
        if opens is None:  # found once, and only for images that name the namespace at all
            opens = list(_PACKET_OPEN_RE.finditer(data))
        before = [m for m in opens if m.start() < ns.start()]
        if not before:
            pos = ns.end()
            continue
        start = before[-1]
        close = b"</" + start.group(1) + b":" + start.group(2) + b">"
        end = data.find(close, ns.end())
        end = len(data) if end < 0 else end + len(close)
        yield data[start.start() : end].decode("utf-8", errors="replace")
        pos = max(end, ns.end())


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(marker, payload) of a JPEG's segments up to the image data."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # image data follows: no more metadata segments
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        yield marker, data[pos + 4 : pos + 2 + length]
        pos += 2 + length


def _jpeg_extended_xmp(data: bytes) -> Iterator[bytes]:
    """JPEG extended XMP (XMP spec part 3, 1.1.3.1): a packet too large for one APP1 segment, cut into
    segments of ``signature, GUID (32), full length (4), offset (4), chunk``; reassembled per GUID."""
    parts: dict[bytes, dict[int, bytes]] = {}
    header = len(XMP_EXTENSION_SIGNATURE) + 40
    for marker, payload in _jpeg_segments(data):
        if marker == 0xE1 and payload.startswith(XMP_EXTENSION_SIGNATURE) and len(payload) > header:
            guid = payload[len(XMP_EXTENSION_SIGNATURE) : len(XMP_EXTENSION_SIGNATURE) + 32]
            offset = int.from_bytes(payload[header - 4 : header], "big")
            parts.setdefault(guid, {})[offset] = payload[header:]
    for chunks in parts.values():
        yield b"".join(chunks[offset] for offset in sorted(chunks))


def _inflate(payload: bytes, budget: list[int]) -> bytes:
    """zlib-decompressed ``payload``, at most ``budget[0]`` bytes (shared by the image's chunks)."""
    if budget[0] <= 0:
        return b""
    try:
        out = zlib.decompressobj().decompress(payload, budget[0])
    except zlib.error:  # a damaged chunk holds nothing we can read
        return b""
    budget[0] -= len(out)
    return out


def _raw_profile(text: bytes) -> bytes:
    """ImageMagick's ``Raw profile type NAME`` text: ``\\nNAME\\n  LENGTH\\nHEX...``, hex-decoded."""
    lines = text.strip().split(b"\n", 2)
    if len(lines) < 3:
        return b""
    try:
        return binascii.unhexlify(re.sub(rb"\s+", b"", lines[2]))
    except (binascii.Error, ValueError):
        return b""


def _png_texts(data: bytes) -> Iterator[bytes]:
    """The text of a PNG's ``iTXt``, ``zTXt`` and ``tEXt`` chunks that is not already plain in the file:
    compressed text (zlib), and hex-encoded ``Raw profile type`` text."""
    budget = [MAX_INFLATED_TEXT]
    for kind, payload in _chunks(data, 8, False, 4):
        if kind not in (b"iTXt", b"zTXt", b"tEXt"):
            continue
        keyword, sep, rest = payload.partition(b"\0")
        if not sep:
            continue
        if kind == b"zTXt":  # compression method (0: zlib), then the compressed text
            text = _inflate(rest[1:], budget)
        elif kind == b"iTXt":  # flag, method, language\0, translated keyword\0, text
            if len(rest) < 2:
                continue
            flag, fields = rest[0], rest[2:].split(b"\0", 2)
            if len(fields) < 3:
                continue
            text = _inflate(fields[2], budget) if flag else b""  # uncompressed: already plain in the file
        else:
            text = rest if keyword.lower().startswith(b"raw profile type") else b""
        if keyword.lower().startswith(b"raw profile type"):
            text = _raw_profile(text)
        if text:
            yield text


def _xmp_sources(data: bytes) -> Iterator[bytes]:
    """The bytes XMP packets may be read from: the file itself, then what it holds encoded."""
    yield data
    if data[:2] == b"\xff\xd8":
        yield from _jpeg_extended_xmp(data)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        yield from _png_texts(data)


def plus_data_mining(data: bytes) -> list[str]:
    """The ``DMI-*`` values (upper-cased) of every ``plus:DataMining`` property in every XMP packet of the image."""
    values: list[str] = []
    for source in _xmp_sources(data):
        for packet in _xmp_packets(source):
            values += _packet_data_mining(packet)
    return values


def _packet_data_mining(packet: str) -> list[str]:
    ns = r"[\"']http://ns\.useplus\.org/ldf/xmp/1\.0/[\"']"
    prefixes = [re.escape(p) + ":" for p in re.findall(rf"xmlns:([\w.-]+)\s*=\s*{ns}", packet, re.I)]
    if re.search(rf"xmlns\s*=\s*{ns}", packet, re.I):
        prefixes.append("")  # PLUS as the default namespace: <DataMining>
    texts: list[str] = []
    # Bounded runs ({0,4096}): a hostile packet full of unclosed tags or quotes costs linear time, not quadratic.
    for prefix in prefixes:
        if prefix:
            texts += re.findall(rf"(?<![\w.:-]){prefix}DataMining\s*=\s*[\"']([^\"']{{0,4096}})[\"']", packet)
        for m in re.finditer(rf"<{prefix}DataMining\b([^>]{{0,4096}})>([^<]{{0,4096}})", packet):
            texts.append(m.group(1) + m.group(2))
    return [v.upper() for v in re.findall(r"DMI-[A-Z-]*[A-Z]", " ".join(texts), re.I)]


# -- C2PA / CAWG training-mining assertions ---------------------------------------------------
def _jpeg_jumbf(data: bytes) -> bytes:
    """C2PA JUMBF from JPEG APP11 segments: per box instance, payloads in sequence order,
    the repeated 8-byte box header of continuation segments removed (ISO 19566-5)."""
    parts: dict[int, list[tuple[int, bytes]]] = {}
    for marker, segment in _jpeg_segments(data):
        if marker == 0xEB and segment[:2] == b"JP" and len(segment) > 16:
            instance, sequence = int.from_bytes(segment[2:4], "big"), int.from_bytes(segment[4:8], "big")
            parts.setdefault(instance, []).append((sequence, segment[8:]))
    out = []
    for chunks in parts.values():
        chunks.sort()
        out.append(chunks[0][1] + b"".join(c[8:] for _, c in chunks[1:]))
    return b"".join(out)


def _chunks(data: bytes, start: int, little_endian: bool, header: int) -> Iterator[tuple[bytes, bytes]]:
    """(type, payload) of PNG (big-endian length, then type, CRC after) or RIFF (type, then little-endian length) chunks."""
    pos = start
    order = "little" if little_endian else "big"
    while pos + 8 <= len(data):
        if little_endian:
            kind, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], order)
        else:
            size, kind = int.from_bytes(data[pos : pos + 4], order), data[pos + 4 : pos + 8]
        yield kind, data[pos + 8 : pos + 8 + size]
        pos += 8 + size + header + (size & 1 if little_endian else 0)


def c2pa_jumbf(data: bytes) -> bytes:
    """The C2PA manifest store (JUMBF) embedded in a JPEG, PNG or WebP, or b""."""
    if data[:2] == b"\xff\xd8":
        return _jpeg_jumbf(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"".join(p for kind, p in _chunks(data, 8, False, 4) if kind == b"caBX")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return b"".join(p for kind, p in _chunks(data, 12, True, 0) if kind == b"C2PA")
    return b""


def _assertion_payloads(jumbf: bytes, labels: Iterable[bytes]) -> Iterator[tuple[str, Any]]:
    """(label, decoded content) of each assertion box whose description label starts with one of ``labels``
    (in any case)."""
    folded = jumbf.lower()  # ASCII case folding keeps every offset
    for label in labels:
        start = 0
        while (at := folded.find(label.lower(), start)) >= 0:
            start = at + 1
            end = jumbf.find(b"\0", at)
            if end < 0 or end - at > 128:
                continue
            full = jumbf[at:end].decode("ascii", errors="replace")
            for kind in (b"cbor", b"json"):
                box = jumbf.find(kind, end, end + 96)
                if box < 4:
                    continue
                size = int.from_bytes(jumbf[box - 4 : box], "big")
                payload = jumbf[box + 4 : box - 4 + size] if size >= 8 else jumbf[box + 4 :]
                try:
                    yield full, _decode(kind, payload)
                except Exception:  # noqa: BLE001 - a damaged assertion is no opt-out we can read
                    pass
                break


def _decode(kind: bytes, payload: bytes) -> Any:
    if kind == b"json":
        return json.loads(payload)
    import cbor2

    return cbor2.loads(payload)


def c2pa_training_refusal(data: bytes) -> str | None:
    """``"<assertion>: <entry> <use>"`` for the first AI-training / data-mining refusal in the image's C2PA manifest."""
    jumbf = c2pa_jumbf(data)
    if not jumbf:
        return None
    for label, doc in _assertion_payloads(jumbf, C2PA_TRAINING_LABELS):
        entries = doc.get("entries") if isinstance(doc, dict) else None
        if not isinstance(entries, dict):
            continue
        for key, entry in entries.items():
            use = entry.get("use") if isinstance(entry, dict) else None
            if str(key).lower() in C2PA_TRAINING_KEYS and isinstance(use, str) and use.lower() in C2PA_REFUSALS:
                return f"{label}: {key} {use}"
    return None


def embedded_opt_out(data: bytes, prohibiting_dmi: Iterable[str]) -> str | None:
    """Why the image's own metadata refuses AI training / data mining, or None.

    ``prohibiting_dmi`` (``download.embedded_optout_dmi_values``) adds values to refuse on; every
    ``DMI-PROHIBITED*`` value refuses whether it is listed or not.
    """
    prohibited = {v.upper() for v in prohibiting_dmi}
    for value in plus_data_mining(data):
        if value.startswith(DMI_PROHIBITED_PREFIX) or value in prohibited:
            return f"XMP plus:DataMining {value}"
    return c2pa_training_refusal(data)
