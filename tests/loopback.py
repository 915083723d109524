"""Loopback helpers: run an ASGI app under uvicorn on a free port, and send raw HTTP.

Raw sockets because HTTP clients normalise what these tests must send as is: ``..``
segments, ``%2E%2E``, chunked bodies cut into chosen pieces.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterable, Iterator


@contextlib.contextmanager
def serve_asgi(app: Any) -> Iterator[tuple[str, int]]:
    """(host, port) of ``app`` served by uvicorn in a thread until the block ends."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield "127.0.0.1", server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def raw_request(
    addr: tuple[str, int],
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    chunks: Iterable[bytes] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    """Send one request exactly as written; ``chunks`` go out with chunked transfer encoding.

    Returns (status, response body). The server may answer and close before the whole body
    is sent (that is the point of a streaming limit), so send errors end the upload quietly.
    """
    head = [f"{method} {target} HTTP/1.1", f"Host: {addr[0]}:{addr[1]}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if chunks is not None:
        head.append("Transfer-Encoding: chunked")
    elif body is not None:
        head.append(f"Content-Length: {len(body)}")
    with socket.create_connection(addr, timeout=timeout) as sock:
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            if body is not None:
                sock.sendall(body)
            if chunks is not None:
                for chunk in chunks:
                    if chunk:
                        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                data += part
    head_bytes, _, rest = bytes(data).partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_bytes.lower():
        rest = _dechunk(rest)
    return status, rest


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)
