"""The WAT side of extract: a typed msgspec decoder that materialises only the image links of a record."""

from __future__ import annotations

import logging
from typing import Any

import msgspec


log = logging.getLogger(__name__)

IMG_PATH = "IMG@/src"
IMG_MARKER = b'"IMG@/src"'


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


