"""Search service limits against a real loopback server: chunked and JSON bodies are cut off
while they stream, and a query image is read up to its limit (and refused, saying so, above it)."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from laion_tasks import layout
from laion_tasks.config import IndexConfig
from laion_tasks.serve import create_app
from laion_tasks.serve.limits import MULTIPART_OVERHEAD
from laion_tasks.stages.index import build_index
from tests.index_fixtures import SNAPSHOT, SUBSET, generate, tiny_encoder, tiny_settings
from tests.loopback import raw_request, serve_asgi

LIMIT = 100_000
BOUNDARY = "----laionboundary"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("limits")
    generated = generate(root, tiny_encoder(), shards=1, rows_per_shard=30)
    out = layout.index_dir(str(root), SNAPSHOT, SUBSET)
    build_index(generated.embedding_uris, generated.clip_uris, out, IndexConfig(), generated.subset_uris)
    return out


def png(size: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((size, size), 64).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def multipart_chunks(payload: bytes, piece: int = 16_384) -> Iterator[bytes]:
    yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n"
           "Content-Type: image/png\r\n\r\n").encode()  # fmt: skip
    for i in range(0, len(payload), piece):
        yield payload[i : i + piece]
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


class ReadCounter:
    """ASGI wrapper counting the body bytes the app pulled from the server."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.read = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def counted() -> dict:
            message = await receive()
            self.read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def test_chunked_upload_over_the_limit_is_refused_while_streaming(index_dir: str) -> None:
    app = ReadCounter(create_app(index_dir, tiny_settings(max_upload_bytes=LIMIT)))
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    with serve_asgi(app) as addr:
        small = raw_request(addr, "POST", "/api/search/image", headers, chunks=multipart_chunks(png()))
        assert small[0] == 200, small
        app.read = 0
        status, body = raw_request(addr, "POST", "/api/search/image", headers, chunks=multipart_chunks(b"\0" * (8 * LIMIT)))
    assert status == 413, body
    assert "serve.max_upload_bytes" in json.loads(body)["detail"]
    # The multipart parser stopped at the limit: it never read (or spooled) the rest. One ASGI
    # body message can carry up to one socket read (asyncio reads 256 KiB at a time), so that is
    # the slack past the limit; the client sent 8x the limit.
    assert app.read <= LIMIT + MULTIPART_OVERHEAD + 256 * 1024, app.read
    assert app.read < 8 * LIMIT, app.read


def test_json_bodies_are_limited_chunked_or_declared(index_dir: str) -> None:
    settings = tiny_settings(max_upload_bytes=LIMIT, max_request_bytes=20_000)
    app = create_app(index_dir, settings)
    huge = json.dumps({"embedding": [0.123456789] * 20_000}).encode()
    headers = {"Content-Type": "application/json"}
    with serve_asgi(app) as addr:
        ok = raw_request(addr, "POST", "/api/search", headers, body=json.dumps({"text": "a red cat", "k": 3}).encode())
        assert ok[0] == 200, ok
        chunked = raw_request(addr, "POST", "/api/search", headers, chunks=(huge[i : i + 4096] for i in range(0, len(huge), 4096)))
        declared = raw_request(addr, "POST", "/api/search", headers, body=huge)
        export = raw_request(addr, "POST", "/api/export?format=json", headers, chunks=iter([huge]))
    for status, body in (chunked, declared, export):
        assert status == 413 and "serve.max_request_bytes" in json.loads(body)["detail"], (status, body)


@pytest.fixture
def image_server() -> Iterator[str]:
    """/split.png arrives in two TCP segments; /big.png (chunked, no length) is over the limit."""
    image = png(48)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            if self.path == "/split.png":
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                half = len(image) // 2
                self.wfile.write(image[:half])
                self.wfile.flush()
                time.sleep(0.3)  # the second segment comes later
                self.wfile.write(image[half:])
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(3 * LIMIT // 8192):
                self.wfile.write(b"2000\r\n" + b"\xab" * 8192 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_query_image_is_read_whole_up_to_the_limit(index_dir: str, image_server: str) -> None:
    from fastapi.testclient import TestClient

    settings = tiny_settings(max_upload_bytes=LIMIT, allow_url_queries=True)
    settings.download.allow_private_networks = True  # the image server is on loopback
    client = TestClient(create_app(index_dir, settings))
    split = client.post("/api/search", json={"image_url": f"{image_server}/split.png", "k": 3})
    assert split.status_code == 200, split.text
    big = client.post("/api/search", json={"image_url": f"{image_server}/big.png", "k": 3})
    assert big.status_code == 413, big.text
    assert f"over {LIMIT} bytes" in big.json()["detail"] and "max_upload_bytes" in big.json()["detail"]
