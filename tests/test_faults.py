"""Fault tolerance: S3 errors are retried then fail clearly; a killed stage leaves no finished-looking output."""

from __future__ import annotations

import http.client
import http.server
import threading
from typing import Iterator

import pytest

from laion_tasks import storage
from laion_tasks.config import StorageConfig


class FlakyS3Proxy:
    """Forwards to moto_server but answers 500 to the next ``fail_next`` requests."""

    def __init__(self, upstream_port: int) -> None:
        self.fail_next = 0
        self.failures_sent = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.fail_next > 0:
                    proxy.fail_next -= 1
                    proxy.failures_sent += 1
                    payload = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = self.headers.get("Host", "")
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def flaky(moto_server, s3_root: str) -> Iterator[tuple[FlakyS3Proxy, str]]:  # type: ignore[no-untyped-def]
    proxy = FlakyS3Proxy(moto_server.port)
    storage.configure(StorageConfig(s3_endpoint_url=proxy.url, s3_max_attempts=4))
    yield proxy, s3_root
    proxy.close()
    storage.configure(StorageConfig(s3_endpoint_url=moto_server.url))


def test_transient_s3_500_is_retried(flaky: tuple[FlakyS3Proxy, str]) -> None:
    proxy, root = flaky
    uri = storage.join(root, "shard.parquet")
    proxy.fail_next = 2
    storage.write_bytes(uri, b"payload")
    proxy.fail_next = 2
    assert storage.read_bytes(uri) == b"payload"
    assert proxy.failures_sent == 4


def test_persistent_s3_500_fails_clearly(flaky: tuple[FlakyS3Proxy, str]) -> None:
    proxy, root = flaky
    uri = storage.join(root, "never.parquet")
    proxy.fail_next = 100
    with pytest.raises(storage.StorageError) as info:
        storage.write_bytes(uri, b"payload")
    message = str(info.value)
    assert "never.parquet" in message and "InternalError" in message and "max retries" in message
    assert proxy.failures_sent >= 4, "retried before giving up"
    proxy.fail_next = 0
    assert not storage.exists(uri)
