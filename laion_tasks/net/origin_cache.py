"""Per-origin answers (robots.txt, tdmrep.json): asked once per origin per task, kept until they expire.

Two layers:

* :class:`SharedOriginStore`: one directory per task process (a batch of shards), on local
  disk, that every download worker process of every shard of the task consults. One JSON
  record per (kind, origin) with its expiry time, zlib-compressed (a robots.txt body shrinks
  several-fold); a per-record ``flock`` makes exactly one process fetch a missing or expired
  record while the others wait for it. ``flock`` locks die with their process, so a worker
  killed mid-fetch never blocks the others. The directory is removed when the task closes
  it, or when its creator exits without doing so.
* :class:`OriginCache`: inside one event loop, one load in flight per origin shared by every
  coroutine that asks, reused until the value's own expiry.

How long an answer is kept is the fetcher's decision: ``download.opt_out_cache_ttl_s`` for
a definitive answer (RFC 9309 §2.4: at most 24 hours), at most :data:`TRANSIENT_TTL_S` for a
transient failure (5xx, 429, timeout, unreachable), so one bad minute of a server does not
decide a whole task.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")

_REMOVERS: dict[str, "weakref.finalize"] = {}
"""Per store created here: removes its directory when it is closed, collected, or at exit."""

TRANSIENT_TTL_S = 600.0
"""The longest a transient failure to get an origin's file is reused before it is asked again."""

Record = dict[str, Any]
Fetch = Callable[[], Awaitable[tuple[Record, float]]]
"""Fetches one origin's file: (JSON-serialisable record, seconds it may be reused)."""


@dataclass
class SharedOriginStore:
    """Per-origin records shared by the processes of one task, under ``root`` (see the module doc).

    Picklable (a path): worker processes get a copy and read and write the same directory.
    Only the process that created it removes it (:meth:`close`).
    """

    root: str
    owner_pid: int = field(default_factory=os.getpid)

    @classmethod
    def create(cls, parent: str | None = None) -> "SharedOriginStore":
        """A fresh, private (0700) directory under ``parent`` (default: the temp dir, ``TMPDIR``),
        removed at :meth:`close`, or when this process exits (a caller that never closes it)."""
        store = cls(tempfile.mkdtemp(prefix="laion-optout-cache-", dir=parent))
        _REMOVERS[store.root] = weakref.finalize(store, shutil.rmtree, store.root, True)
        return store

    def close(self) -> None:
        if os.getpid() == self.owner_pid:
            remover = _REMOVERS.pop(self.root, None)
            if remover is not None:
                remover()
            shutil.rmtree(self.root, ignore_errors=True)

    def _path(self, kind: str, origin: str) -> str:
        return os.path.join(self.root, f"{kind}-{hashlib.sha256(origin.encode()).hexdigest()[:32]}.json.z")

    def _read(self, path: str, origin: str, now: float) -> tuple[Record, float] | None:
        try:
            with open(path, "rb") as handle:
                entry = json.loads(zlib.decompress(handle.read()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, zlib.error):  # unreadable: fetch again and overwrite it
            return None
        if not isinstance(entry, dict) or entry.get("origin") != origin or not isinstance(entry.get("record"), dict):
            return None
        expires_at = float(entry.get("expires_at", 0))
        return (entry["record"], expires_at) if expires_at > now else None

    def _write(self, path: str, origin: str, record: Record, expires_at: float) -> None:
        entry = {"origin": origin, "fetched_at": time.time(), "expires_at": expires_at, "record": record}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(zlib.compress(json.dumps(entry).encode(), 1))
            os.replace(tmp, path)  # readers see the old record or the new one, never half of one
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    async def get(self, kind: str, origin: str, fetch: Fetch, lock_wait_s: float) -> tuple[Record, float]:
        """(record, expiry as ``time.time()``) for ``origin``: the stored one while it is fresh, else fetched
        once by whichever process takes the record's lock first. A holder slower than ``lock_wait_s`` (it
        should not be: fetches have a deadline) is not waited for: this process fetches for itself."""
        path = self._path(kind, origin)
        hit = self._read(path, origin, time.time())
        if hit is not None:
            return hit
        try:
            lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # the directory is gone (removed under us): answer without sharing
            record, lifetime = await fetch()
            return record, time.time() + lifetime
        locked = False
        try:
            locked = await _flock(lock_fd, lock_wait_s)
            hit = self._read(path, origin, time.time())
            if hit is not None:
                return hit
            record, lifetime = await fetch()
            expires_at = time.time() + lifetime
            try:
                self._write(path, origin, record, expires_at)
            except OSError:  # a full or vanished temp dir costs the sharing, not the answer
                pass
            return record, expires_at
        finally:
            if locked:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)


async def _flock(fd: int, wait_s: float) -> bool:
    """Take an exclusive ``flock`` without blocking the event loop; False if ``wait_s`` passed first."""
    deadline = time.monotonic() + wait_s
    pause = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.1)


async def fetch_shared(store: SharedOriginStore | None, kind: str, origin: str, fetch: Fetch,
                       lock_wait_s: float) -> tuple[Record, float]:
    """Through ``store`` when there is one; else fetched here. Returns (record, expiry as ``time.time()``)."""
    if store is not None:
        return await store.get(kind, origin, fetch, lock_wait_s)
    record, lifetime = await fetch()
    return record, time.time() + lifetime


class OriginCache(Generic[T]):
    """``await cache.get(origin)``: one ``load(origin)`` in flight per origin; its result is reused
    until ``expires_at(result)`` (a ``time.time()``), or for ``ttl_s`` seconds without one."""

    def __init__(
        self,
        load: Callable[[str], Awaitable[T]],
        ttl_s: float,
        expires_at: Callable[[T], float] | None = None,
    ) -> None:
        self._load = load
        self.ttl_s = ttl_s
        self._expires_at = expires_at
        self._entries: dict[str, tuple[float, asyncio.Future[T]]] = {}

    def _stale(self, loaded_at: float, future: asyncio.Future[T]) -> bool:
        if not future.done():
            return False  # in flight: share it
        if future.cancelled() or future.exception() is not None:
            return True
        if self._expires_at is not None:
            return time.time() >= self._expires_at(future.result())
        return time.monotonic() - loaded_at > self.ttl_s

    async def get(self, origin: str) -> T:
        entry = self._entries.get(origin)
        if entry is None or self._stale(*entry):
            entry = self._entries[origin] = (time.monotonic(), asyncio.ensure_future(self._load(origin)))
        return await asyncio.shield(entry[1])

    def close(self) -> None:
        for _, future in self._entries.values():
            future.cancel()
