"""Opt-outs the download stage honours beyond one response's headers.

* :class:`HostOptOuts`: once an origin opts out host-wide for our agent (robots.txt
  disallows everything, or is unavailable; tdmrep.json reserves every path), its other
  URLs in the shard get the same status without a request.
* :func:`embedded_opt_out`: "no AI training" written into the image itself, read from the
  original bytes before anything is decoded or written:

  - the IPTC PLUS *Data Mining* property (``plus:DataMining`` in XMP, namespace
    ``http://ns.useplus.org/ldf/xmp/1.0/``) with a prohibiting value
    (``download.embedded_optout_dmi_values``);
  - a C2PA / CAWG training-and-data-mining assertion (``c2pa.training-mining``,
    ``cawg.training-mining``) whose AI-training or data-mining entry says ``notAllowed``
    or ``constrained`` (constraints we cannot check count as a refusal). The manifest is
    read from JPEG APP11, PNG ``caBX`` or WebP ``C2PA`` JUMBF boxes; its signature is not
    verified: a claim to opt out is honoured whoever made it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from laion_tasks.net.robots import origin_of

PLUS_NS = b"ns.useplus.org/ldf/xmp/1.0/"
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
    """The XMP packets that declare the PLUS namespace (XMP is stored as plain text in every format)."""
    start = 0
    while (at := data.find(PLUS_NS, start)) >= 0:
        begin = max(data.rfind(b"<x:xmpmeta", 0, at), data.rfind(b"<rdf:RDF", 0, at))
        end_meta, end_rdf = data.find(b"</x:xmpmeta>", at), data.find(b"</rdf:RDF>", at)
        ends = [e for e in (end_meta, end_rdf) if e >= 0]
        if begin < 0 or not ends:
            return
        end = max(ends)
        yield data[begin : end + 12].decode("utf-8", errors="replace")
        start = end + 1


def plus_data_mining(data: bytes) -> list[str]:
    """The ``DMI-*`` values of every ``plus:DataMining`` property in the image's XMP."""
    values: list[str] = []
    for packet in _xmp_packets(data):
        prefixes = re.findall(r"xmlns:([\w.-]+)\s*=\s*[\"']http://ns\.useplus\.org/ldf/xmp/1\.0/[\"']", packet)
        for prefix in map(re.escape, prefixes):
            texts = re.findall(rf"\b{prefix}:DataMining\s*=\s*[\"']([^\"']*)[\"']", packet)
            for m in re.finditer(rf"<{prefix}:DataMining\b([^>]*?)(?:/>|>(.*?)</{prefix}:DataMining\s*>)", packet, re.S):
                texts.append(m.group(1) + (m.group(2) or ""))
            values += re.findall(r"DMI-[A-Z-]*[A-Z]", " ".join(texts))
    return values


# -- C2PA / CAWG training-mining assertions ---------------------------------------------------
def _jpeg_jumbf(data: bytes) -> bytes:
    """C2PA JUMBF from JPEG APP11 segments: per box instance, payloads in sequence order,
    the repeated 8-byte box header of continuation segments removed (ISO 19566-5)."""
    parts: dict[int, list[tuple[int, bytes]]] = {}
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
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xEB and segment[:2] == b"JP" and len(segment) > 16:
            instance, sequence = int.from_bytes(segment[2:4], "big"), int.from_bytes(segment[4:8], "big")
            parts.setdefault(instance, []).append((sequence, segment[8:]))
        pos += 2 + length
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
    """(label, decoded content) of each assertion box whose description label starts with one of ``labels``."""
    for label in labels:
        start = 0
        while (at := jumbf.find(label, start)) >= 0:
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
            if key in C2PA_TRAINING_KEYS and isinstance(use, str) and use.lower() in C2PA_REFUSALS:
                return f"{label}: {key} {use}"
    return None


def embedded_opt_out(data: bytes, prohibiting_dmi: Iterable[str]) -> str | None:
    """Why the image's own metadata refuses AI training / data mining, or None."""
    prohibited = {v.upper() for v in prohibiting_dmi}
    for value in plus_data_mining(data):
        if value.upper() in prohibited:
            return f"XMP plus:DataMining {value}"
    return c2pa_training_refusal(data)
