"""Per-origin results (robots.txt, tdmrep.json) loaded once, shared by concurrent askers, kept for a TTL."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")


class OriginCache(Generic[T]):
    """``await cache.get(origin)``: one ``load(origin)`` in flight per origin; its result is
    reused for ``ttl_s`` seconds (RFC 9309 asks for no more than 24 hours), then loaded again."""

    def __init__(self, load: Callable[[str], Awaitable[T]], ttl_s: float) -> None:
        self._load = load
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, asyncio.Future[T]]] = {}

    async def get(self, origin: str) -> T:
        now = time.monotonic()
        entry = self._entries.get(origin)
        if entry is None or (entry[1].done() and now - entry[0] > self.ttl_s):
            entry = self._entries[origin] = (now, asyncio.ensure_future(self._load(origin)))
        return await asyncio.shield(entry[1])

    def close(self) -> None:
        for _, future in self._entries.values():
            future.cancel()
