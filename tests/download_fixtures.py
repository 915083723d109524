"""A real HTTP server on loopback for the download tests, with hostile routes.

Every request path is recorded, so tests can prove a URL was never fetched.
"""

from __future__ import annotations

import gzip
import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

Handler = Callable[[BaseHTTPRequestHandler], None]


def send(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    headers = dict(headers or {})
    headers.setdefault("Content-Type", "image/jpeg" if status == 200 else "text/plain")
    for name, value in headers.items():
        h.send_header(name, value)
    if "Content-Length" not in headers:
        h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD" and body:
        h.wfile.write(body)


class FixtureServer:
    """ThreadingHTTPServer serving ``routes``; unknown paths are 404."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[str] = []
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                with server._lock:
                    server.requests.append(self.path)
                    server.counts[self.path] += 1
                route = server.routes.get(self.path.split("?", 1)[0])
                try:
                    if route is None:
                        send(self, 404, b"not found")
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FixtureServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def static(self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> str:
        self.routes[path] = lambda h: send(h, status, body, headers)
        return path

    def seen(self, path: str) -> int:
        with self._lock:
            return self.counts[path]


# -- hostile routes ------------------------------------------------------------------
def fail_then_ok(fails: int, status: int, body: bytes, headers: dict[str, str] | None = None) -> Handler:
    calls = Counter()
    lock = threading.Lock()

    def handler(h: BaseHTTPRequestHandler) -> None:
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n <= fails:
            send(h, status, b"try again", headers)
        else:
            send(h, 200, body)

    return handler


def redirect(location: str, status: int = 302) -> Handler:
    return lambda h: send(h, status, b"", {"Location": location, "Content-Type": "text/plain"})


def slow_body(total: int = 100_000, chunk: int = 1000, pause_s: float = 0.3) -> Handler:
    def handler(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(total))
        h.end_headers()
        for _ in range(total // chunk):
            h.wfile.write(b"\xff" * chunk)
            h.wfile.flush()
            time.sleep(pause_s)

    return handler


def huge_body(total: int, announce_length: bool) -> Handler:
    def handler(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        if announce_length:
            h.send_header("Content-Length", str(total))
        else:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        block = b"\0" * (1 << 20)
        for _ in range(total // len(block)):
            h.wfile.write(block)

    return handler


# -- generated images (used when ../shared is absent, and for hostile cases) -----------
def make_jpeg(width: int = 320, height: int = 240, color: tuple[int, int, int] = (200, 80, 40), quality: int = 90) -> bytes:
    img = Image.new("RGB", (width, height), color)
    for x in range(0, width, 16):  # some structure, so the JPEG is not trivially small
        img.paste((x % 255, 255 - x % 255, (x * 7) % 255), (x, 0, min(width, x + 8), height))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def make_png_rgba(width: int = 64, height: int = 48) -> bytes:
    img = Image.new("RGBA", (width, height), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 0, width // 2, height))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def make_exif_rotated_jpeg(width: int = 200, height: int = 100) -> bytes:
    """Stored landscape, EXIF orientation 6 (display rotated 90 degrees: portrait)."""
    img = Image.new("RGB", (width, height), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    img.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def make_png_bomb(side: int = 12_000) -> bytes:
    """A small PNG whose header claims side*side pixels (above Pillow's 89.5 Mpx default)."""
    img = Image.new("1", (side, side), 0)
    out = io.BytesIO()
    img.save(out, "PNG", optimize=False)
    return out.getvalue()


def gzip_bomb(size: int) -> bytes:
    return gzip.compress(b"\0" * size, compresslevel=9)


HTML_PAGE = b"<!doctype html><html><head><title>Not an image</title></head><body>" + b"<p>hello</p>" * 200 + b"</body></html>"


def warc_images(path: Path) -> Iterator[tuple[str, bytes, str]]:
    """(url, body, content-type) of every image response in a WARC (fastwarc)."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    with open(path, "rb") as stream:
        for record in ArchiveIterator(stream, record_types=WarcRecordType.response, parse_http=True):
            http = record.http_headers
            if http is None or http.status_code != 200:
                continue
            ctype = (http.get("Content-Type") or "").split(";")[0].strip().lower()
            if not ctype.startswith("image/"):
                continue
            body = record.reader.read()
            if body:
                yield record.headers.get("WARC-Target-URI").strip("<>"), body, ctype


def write_shard(path: Path, urls: list[str], captions: list[str] | None = None, with_key: bool = True) -> str:
    """A download shard as the regroup step writes it (candidate columns + key)."""
    n = len(urls)
    columns = {
        "uid": [f"{i:032x}" for i in range(n)],
        "url": urls,
        "alt": captions or [f"caption {i}" for i in range(n)],
        "page_url": [f"https://example.org/page{i}.html" for i in range(n)],
        "wat_file": ["test.warc.wat.gz"] * n,
        "record_date": ["2024-01-01T00:00:00Z"] * n,
    }
    if with_key:
        columns = {"key": [f"000000{i:05d}" for i in range(n)], **columns}
    pq.write_table(pa.table(columns), path)
    return str(path)
