"""Request-body limits enforced while the body streams in, not from ``Content-Length`` alone.

A chunked request has no ``Content-Length``, and a client may send more than it declared,
so the header check is only the early answer: every body chunk is counted as the app reads
it, and the read that crosses the limit fails with 413. The multipart parser and the JSON
decoder therefore never see (or spool to disk) more than the limit.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import HTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MULTIPART_OVERHEAD = 64 * 1024
"""Room for the multipart boundaries and form fields around an upload of the largest allowed size."""


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int, knob: str) -> None:
        super().__init__(413, f"request body is over {limit} bytes ({knob})")


class BodyLimitMiddleware:
    """Pure ASGI middleware: multipart bodies up to ``upload_bytes`` (+ form overhead), any other body up to ``other_bytes``."""

    def __init__(self, app: ASGIApp, upload_bytes: int, other_bytes: int) -> None:
        self.app = app
        self.upload_bytes = upload_bytes
        self.other_bytes = other_bytes

    def limit_for(self, scope: Scope) -> tuple[int, str]:
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type == b"multipart/form-data":
            return self.upload_bytes + MULTIPART_OVERHEAD, "serve.max_upload_bytes"
        return self.other_bytes, "serve.max_request_bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, knob = self.limit_for(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, BodyTooLarge(limit, knob))
            return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit, knob)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:  # raised outside FastAPI's own exception handling
            if started:
                raise
            await _refuse(send, exc)


async def _refuse(send: Send, exc: HTTPException) -> None:
    import json

    body = json.dumps({"detail": exc.detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status_code,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})
