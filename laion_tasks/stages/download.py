"""Download stage: fetch the images of one shard into a WebDataset tar + a status Parquet.

One shard in, two objects out:

- ``<shard>.tar``: ``KEY.jpg`` (or ``.webp``), ``KEY.txt`` (caption), ``KEY.json`` per success,
  readable by ``webdataset`` and open_clip's training loader. Members are in completion
  order (writing as results arrive keeps memory bounded).
- ``<shard>.parquet``: EVERY input row, in input order, with the input columns plus
  ``caption`` and ``status``/``error_message``/sizes/``mime_type``/``sha256``/``final_url``.

Outcomes in :class:`ShardStats`: ``success`` or ``fail:<status>`` for every other status,
opt-outs and safety blocks included (their status names say so: ``opted_out_*``,
``blocked_ssrf``, ``blocked_hashlist``).

Parallelism: the rows are dealt round-robin to ``processes`` worker processes (default: one
per core). Each runs its own aiohttp event loop and decodes/resizes/encodes in its own small
thread pool (Pillow releases the GIL), and sends back only the status row and the encoded
output; the parent writes the tar and the Parquet. The global and per-host limits are divided
by the number of workers; robots.txt is fetched and cached once per origin PER WORKER. A
blocklist that cannot be pickled makes the run stay in this process (one loop, same checks).

Networking (aiohttp, per worker): a global concurrency limit and a per-host one, a
total deadline per attempt (redirects and body included, waiting for the first slot
excluded), retries with exponential backoff and jitter on timeouts, connection errors,
429 (Retry-After honoured up to ``backoff_max_s``) and 5xx; redirects are followed by hand
so every hop is re-checked (SSRF guard, hash list, robots.txt); the body size is capped
while streaming. The SSRF guard also sits in the resolver, so the connect uses the
addresses that were checked. Decode/resize/encode (:mod:`laion_tasks.stages.image_ops`)
runs in the worker's thread pool, so its loop never blocks on pixels.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import math
import multiprocessing
import os
import pickle
import random
import tarfile
import time
import urllib.robotparser
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol
from urllib.parse import urljoin, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from laion_tasks import storage
from laion_tasks.config import DownloadConfig
from laion_tasks.net import ssrf
from laion_tasks.stage import read_parquet, ShardStats, StageError
from laion_tasks.stages.image_ops import ImageOptions, ImageResult, process_image
from laion_tasks.stages.regroup import sample_key

log = logging.getLogger(__name__)

SUCCESS = "success"
RETRYABLE_STATUSES = frozenset({"timeout", "connection_error", "http_429", "robots_txt_unavailable"})
"""Plus every ``http_5xx``: see :func:`is_retryable`."""
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
ROBOTS_MAX_BYTES = 500 * 1024
"""RFC 9309: crawlers must parse at least 500 KiB; we read no more."""
TAR_MTIME = 1_700_000_000
"""Fixed tar member mtime, so the same results give the same tar bytes. An int: a float mtime
makes tarfile add a PAX header block pair to every member (slower, ~1.5 KB more per sample)."""
KNOWN_DIRECTIVES_WITH_COLON = ("unavailable_after", "max-snippet", "max-image-preview", "max-video-preview")

RESULT_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("original_bytes", pa.int64()),
        ("mime_type", pa.string()),
        ("sha256", pa.string()),
        ("final_url", pa.string()),
    ]
)


class Blocklist(Protocol):
    """Safety hash lists (implemented by ``laion_tasks.hashlists.HashLists``).

    ``url_blocked`` is asked BEFORE any request to a URL (every redirect hop too), so a
    listed URL is never fetched; ``image_blocked`` is asked on the original bytes right
    after the fetch, and a listed image is never decoded nor written anywhere.
    """

    def url_blocked(self, url: str) -> bool: ...

    def image_blocked(self, data: bytes) -> bool: ...


def is_retryable(status: str | None) -> bool:
    return bool(status) and (status in RETRYABLE_STATUSES or (status.startswith("http_5") and len(status) == 8))


@dataclass
class SampleResult:
    status: str
    error_message: str | None = None
    final_url: str | None = None
    image: ImageResult | None = None


class _Failure(Exception):
    """One attempt failed with a status; ``retry_after`` comes from a 429/503 header."""

    def __init__(self, status: str, message: str, url: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.url = url
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def user_agent_token(user_agent: str) -> str:
    """The product token robots rules and ``X-Robots-Tag: <ua>:`` prefixes refer to."""
    return user_agent.split("/", 1)[0].strip().lower()


def x_robots_opt_out(values: Iterable[str], ua_token: str, disallowed: Iterable[str]) -> str | None:
    """The disallowed directive found in X-Robots-Tag headers meant for us, else None.

    Handles ``noai, noimageai`` and the ``useragent: noai`` form; a directive addressed
    to another agent does not apply.
    """
    disallowed = {d.lower() for d in disallowed}
    if not disallowed:
        return None
    for value in values:
        target: str | None = None
        body = value
        head, sep, rest = value.partition(":")
        head = head.strip().lower()
        if sep and "," not in head and head not in KNOWN_DIRECTIVES_WITH_COLON:
            target, body = head, rest
        if target is not None and target not in (ua_token, "*"):
            continue
        for directive in body.split(","):
            directive = directive.strip().lower()
            if directive in disallowed:
                return directive
    return None


def _cause_chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__ or getattr(current, "os_error", None)


def _classify_client_error(exc: BaseException) -> tuple[str, str]:
    """Map an aiohttp/OS exception to (status, message)."""
    import aiohttp

    for inner in _cause_chain(exc):
        if isinstance(inner, ssrf.SSRFBlocked):
            return "blocked_ssrf", str(inner)
    text = f"{type(exc).__name__}: {str(exc)[:300]}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns_error", text
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError)):
        return "ssl_error", text
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid_url", text
    return "connection_error", text


class Fetcher:
    """Polite, guarded fetching on one aiohttp session; shared state per event loop."""

    def __init__(self, config: DownloadConfig, blocklist: Blocklist | None = None) -> None:
        import aiohttp

        self.config = config
        self.blocklist = blocklist
        self.ua_token = user_agent_token(config.user_agent)
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self._host_slots: dict[str, asyncio.Semaphore] = {}
        self._robots: dict[str, asyncio.Task[urllib.robotparser.RobotFileParser | _Failure]] = {}
        self.retries = 0
        self.bytes_downloaded = 0
        connector = aiohttp.TCPConnector(
            limit=config.max_concurrency + 32,  # the semaphores limit requests; head-room for robots.txt
            limit_per_host=0,
            resolver=ssrf.GuardedResolver(allow_private=config.allow_private_networks),
            ttl_dns_cache=300,
            enable_cleanup_closed=True,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s),
            headers={"User-Agent": config.user_agent, "Accept": "image/avif,image/webp,image/*,*/*;q=0.8"},
            trust_env=False,  # never route through environment proxies
            auto_decompress=True,  # the size cap below then applies to decoded bytes (gzip bombs)
        )

    async def close(self) -> None:
        for task in self._robots.values():
            task.cancel()
        await self.session.close()

    def _host_slot(self, host: str) -> asyncio.Semaphore:
        slot = self._host_slots.get(host)
        if slot is None:
            slot = self._host_slots[host] = asyncio.Semaphore(self.config.max_per_host)
        return slot

    def _check_hop(self, url: str) -> None:
        """Checks every URL must pass before we send it a byte."""
        if self.blocklist is not None and self.blocklist.url_blocked(url):
            raise _Failure("blocked_hashlist", "URL is on a safety hash list; not fetched")
        try:
            ssrf.check_url(url, self.config.allow_private_networks)
        except ssrf.SSRFBlocked as exc:
            raise _Failure("blocked_ssrf", str(exc), url) from None
        except ValueError as exc:
            raise _Failure("invalid_url", str(exc), url) from None

    # -- robots.txt -------------------------------------------------------------------
    async def _robots_allows(self, url: str) -> None:
        parts = urlsplit(url)
        origin = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
        task = self._robots.get(origin)
        if task is None:
            task = self._robots[origin] = asyncio.ensure_future(self._load_robots(origin))
        parser = await asyncio.shield(task)
        if isinstance(parser, _Failure):
            raise _Failure(parser.status, parser.message, url)
        if not parser.can_fetch(self.config.user_agent, url):
            raise _Failure("opted_out_robots_txt", f"robots.txt disallows {parts.path or '/'} for {self.ua_token}", url)

    async def _load_robots(self, origin: str) -> urllib.robotparser.RobotFileParser | _Failure:
        """Fetch and parse robots.txt once per origin (RFC 9309 error handling)."""
        parser = urllib.robotparser.RobotFileParser()
        url = f"{origin}/robots.txt"
        try:
            async with asyncio.timeout(self.config.request_deadline_s):
                for _hop in range(5):
                    self._check_hop(url)
                    async with self.session.get(url, allow_redirects=False) as resp:
                        if resp.status in REDIRECT_CODES and resp.headers.get("Location"):
                            url = urljoin(url, resp.headers["Location"])
                            continue
                        if resp.status >= 500 or resp.status == 429:
                            return _Failure("robots_txt_unavailable", f"robots.txt answered HTTP {resp.status}")
                        if resp.status in (401, 403):
                            parser.disallow_all = True  # robotparser's convention
                            return parser
                        if resp.status >= 400:
                            parser.allow_all = True  # RFC 9309: 4xx means no rules
                            return parser
                        body = await resp.content.read(ROBOTS_MAX_BYTES)
                        parser.parse(body.decode("utf-8", errors="replace").splitlines())
                        return parser
                parser.allow_all = True  # RFC 9309: more than 5 redirects -> no rules
                return parser
        except _Failure as exc:
            return _Failure("robots_txt_unavailable", f"robots.txt not fetched: {exc.status}: {exc.message}")
        except TimeoutError:
            return _Failure("robots_txt_unavailable", "robots.txt fetch timed out")
        except Exception as exc:  # noqa: BLE001 - any network failure means "unreachable"
            status, message = _classify_client_error(exc)
            if status == "blocked_ssrf":
                return _Failure(status, message)
            return _Failure("robots_txt_unavailable", f"robots.txt unreachable: {message}")

    # -- one URL ----------------------------------------------------------------------
    async def fetch(self, url: str, process: Any, on_body: Any = None) -> SampleResult:
        """Fetch ``url`` with retries and hand the bytes to ``process`` (async callable).

        ``on_body()`` is called once the body is in, before any work on the bytes.
        """
        attempt = 0
        while True:
            async with self.slots:
                try:
                    data, final_url = await self._attempt(url)
                except _Failure as failure:
                    # robots.txt results are cached per run: retrying now cannot change them.
                    final = failure.status == "robots_txt_unavailable" or not is_retryable(failure.status)
                    if final or attempt >= self.config.retries:
                        return SampleResult(failure.status, failure.message, failure.url)
                    delay = self._backoff(attempt, failure)
                    if delay is None:
                        return SampleResult(
                            failure.status, f"{failure.message}; Retry-After exceeds backoff_max_s", failure.url
                        )
                else:
                    if on_body is not None:
                        on_body()
                    if self.blocklist is not None and self.blocklist.image_blocked(data):
                        return SampleResult("blocked_hashlist", "image bytes are on a safety hash list; not stored")
                    return await process(data, final_url)
            attempt += 1
            self.retries += 1
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int, failure: _Failure) -> float | None:
        cap = self.config.backoff_max_s
        base = min(cap, self.config.backoff_base_s * (2**attempt))
        delay = random.uniform(base / 2, base)  # "equal jitter": spread retries, keep a floor
        if failure.retry_after is not None:
            if failure.retry_after > cap:
                return None
            delay = max(delay, failure.retry_after)
        return delay

    async def _attempt(self, url: str) -> tuple[bytes, str]:
        config = self.config
        seen = {url}
        current = url
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        for hop in range(config.max_redirects + 1):
            self._check_hop(current)
            if config.respect_robots_txt:
                await self._robots_allows(current)
            host_slot = self._host_slot(urlsplit(current).netloc.lower())
            if deadline is None:
                await host_slot.acquire()  # queueing for a busy host is not the server's fault
                deadline = loop.time() + config.request_deadline_s
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        await host_slot.acquire()
                except TimeoutError:
                    raise _Failure("timeout", f"deadline {config.request_deadline_s}s passed at hop {hop}", current) from None
            try:
                async with asyncio.timeout_at(deadline):
                    location = await self._request(current)
            except TimeoutError:
                raise _Failure("timeout", f"no complete response within {config.request_deadline_s}s", current) from None
            except _Failure:
                raise
            except Exception as exc:  # noqa: BLE001 - aiohttp raises many types
                status, message = _classify_client_error(exc)
                raise _Failure(status, message, current) from None
            finally:
                host_slot.release()
            if isinstance(location, bytes):
                return location, current
            if location in seen:
                raise _Failure("redirect_loop", f"redirect loop after {hop + 1} hops", location)
            seen.add(location)
            current = location
        raise _Failure("too_many_redirects", f"more than max_redirects={config.max_redirects} redirects", current)

    async def _request(self, url: str) -> bytes | str:
        """One GET: the body bytes, or the absolute URL a redirect points to."""
        config = self.config
        async with self.session.get(url, allow_redirects=False) as resp:
            status = resp.status
            if not 200 <= status < 300:
                await _drain_small_body(resp)
            if status in REDIRECT_CODES:
                location = resp.headers.get("Location")
                if not location:
                    raise _Failure(f"http_{status}", f"HTTP {status} redirect without Location", url)
                return urljoin(url, location.strip())
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                raise _Failure(f"http_{status}", f"HTTP {status} {resp.reason or ''}".strip(), url, retry_after)
            if not 200 <= status < 300:
                raise _Failure(f"http_{status}", f"HTTP {status} {resp.reason or ''}".strip(), url)
            # Opt-outs are read from the headers, before a byte of the body.
            directive = x_robots_opt_out(
                resp.headers.getall("X-Robots-Tag", []), self.ua_token, config.disallowed_header_directives
            )
            if directive:
                raise _Failure("opted_out_x_robots_tag", f"X-Robots-Tag: {directive}", url)
            if config.respect_tdm_reservation and resp.headers.get("tdm-reservation", "").strip() == "1":
                raise _Failure("opted_out_tdm_reservation", "tdm-reservation: 1", url)
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > config.max_response_bytes:
                raise _Failure("too_large", f"Content-Length {length} > max_response_bytes {config.max_response_bytes}", url)
            if length and length.isdigit() and not resp.headers.get("Content-Encoding"):
                body = await resp.read()  # framed by the announced length, already within the cap
                chunks, size = [body], len(body)
            else:  # unknown or encoded length: count decoded bytes as they stream in
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > config.max_response_bytes:
                        raise _Failure("too_large", f"body exceeds max_response_bytes {config.max_response_bytes}", url)
                    chunks.append(chunk)
            self.bytes_downloaded += size
            if size == 0:
                raise _Failure("empty_body", f"HTTP {status} with an empty body", url)
            return b"".join(chunks)


ERROR_BODY_DRAIN_BYTES = 64 * 1024


async def _drain_small_body(resp: Any) -> None:
    """Read a small non-2xx body (announced length <= 64 KiB) so the connection closes or is
    reused cleanly; an unread body makes the close a TCP reset on the server's side."""
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and 0 < int(length) <= ERROR_BODY_DRAIN_BYTES:
        try:
            await resp.content.read(ERROR_BODY_DRAIN_BYTES)
        except Exception:  # noqa: BLE001 - the status is what counts; the body is discarded
            pass


# -- worker processes --------------------------------------------------------------------
# One shard's rows are split round-robin across P worker processes. Each worker runs its own
# event loop (fetching, with the same guards and opt-out checks) AND decodes/resizes/encodes
# in a small thread pool of its own (Pillow releases the GIL there), then sends back only the
# small result (status + encoded output bytes) over a pipe. The original bytes never cross a
# process boundary, and no single event loop has to carry the whole shard.


def worker_count(config: DownloadConfig) -> int:
    if config.processes > 0:
        return config.processes
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def per_process_config(config: DownloadConfig, processes: int) -> DownloadConfig:
    """Split the global and per-host limits across ``processes`` workers (rounded up).

    Rows are dealt round-robin, so every worker may talk to every host: dividing the
    limits keeps the shard-wide totals at (about) the configured values.
    """
    if processes <= 1:
        return config
    return config.model_copy(
        update={
            "max_concurrency": max(1, math.ceil(config.max_concurrency / processes)),
            "max_per_host": max(1, math.ceil(config.max_per_host / processes)),
        }
    )


_MP_CONTEXT: Any = None


def _mp_context() -> Any:
    """forkserver: the parent may have threads (Airflow, the tests' server), so no plain fork."""
    global _MP_CONTEXT
    if _MP_CONTEXT is None:
        _MP_CONTEXT = multiprocessing.get_context("forkserver")
        _MP_CONTEXT.set_forkserver_preload(["laion_tasks.stages.download", "aiohttp", "PIL.JpegImagePlugin"])
    return _MP_CONTEXT


async def _fetch_rows(
    rows: list[tuple[int, str | None]],
    emit: Any,
    config: DownloadConfig,
    blocklist: Blocklist | None,
    on_body: Any = None,
) -> tuple[int, int]:
    """Fetch and process ``rows`` on the running loop; ``emit(i, result)`` once per row.

    ``on_body(i)`` is called when row i's bytes are in (before the hash-list check and the
    decode). Returns (retries, bytes downloaded).
    """
    options = ImageOptions.from_config(config)
    loop = asyncio.get_running_loop()
    fetcher = Fetcher(config, blocklist)
    executor = (
        concurrent.futures.ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="laion-decode")
        if config.decode_threads > 0
        else None
    )

    async def process(data: bytes, final_url: str) -> SampleResult:
        if executor is None:  # decode_threads=0: inline, blocking this loop while it runs
            image = process_image(data, options)
        else:
            image = await loop.run_in_executor(executor, process_image, data, options)
        return SampleResult(image.status, image.error_message, final_url, image)

    async def one(i: int, url: str | None) -> None:
        if not url or not isinstance(url, str):
            emit(i, SampleResult("invalid_url", "empty URL"))
            return
        try:
            result = await fetcher.fetch(url, process, None if on_body is None else lambda: on_body(i))
        except Exception as exc:  # noqa: BLE001 - a bug must cost one row, not the shard
            log.exception("download of row %d failed unexpectedly", i)
            result = SampleResult("internal_error", f"{type(exc).__name__}: {str(exc)[:300]}")
        emit(i, result)

    try:
        await asyncio.gather(*(one(i, url) for i, url in rows))
    finally:
        await fetcher.close()
        if executor is not None:
            executor.shutdown(wait=True)
    return fetcher.retries, fetcher.bytes_downloaded


def _worker_main(
    rows: list[tuple[int, str | None]],
    config: DownloadConfig,
    blocklist_pickle: bytes | None,
    conn: Any,
) -> None:
    """Worker process: fetch + process ``rows``; sends lists of messages: ("body", i) when row
    i's bytes are in, ("row", i, result) when it is finished, and ("done", ...) at the end."""
    blocklist = pickle.loads(blocklist_pickle) if blocklist_pickle is not None else None

    pending: list[tuple[Any, ...]] = []  # messages go in batches: fewer sends, recvs and wake-ups
    flush_scheduled = False

    def flush() -> None:
        nonlocal flush_scheduled
        flush_scheduled = False
        if pending:
            conn.send(list(pending))
            pending.clear()

    def emit(i: int, result: SampleResult) -> None:
        nonlocal flush_scheduled
        pending.append(("row", i, result))
        if not flush_scheduled:
            flush_scheduled = True
            asyncio.get_running_loop().call_soon(flush)

    def on_body(i: int) -> None:
        pending.append(("body", i))
        flush()  # now: if this process dies on these bytes, the parent must know which row it was

    with asyncio.Runner(loop_factory=_make_loop) as runner:
        retries, downloaded = runner.run(_fetch_rows(rows, emit, config, blocklist, on_body))
    matches = dict(getattr(blocklist, "matches", None) or {})
    pending.append(("done", retries, downloaded, matches))
    flush()
    conn.close()


WORKER_CRASH_ATTEMPTS = 3
"""A worker that dies (e.g. a native crash on a hostile image) blames the rows whose bytes it
was working on (``decode_error``, as a crashed decode pool did before); its other unfinished
rows go to fresh workers, at most this many rounds, then get ``internal_error``."""


def _download_rows(
    urls: list[str | None],
    on_success: Any,
    config: DownloadConfig,
    blocklist: Blocklist | None,
) -> _RunOutcome:
    """Download ``urls``; ``on_success(i, result)`` is called in this process for each success.

    Runs in ``worker_count(config)`` worker processes when the blocklist can be pickled
    (HashLists can); otherwise in this process, on one loop with a decode thread pool.
    """
    results: list[SampleResult | None] = [None] * len(urls)
    outcome = _RunOutcome(results=[])

    def receive(i: int, result: SampleResult) -> None:
        results[i] = result
        if result.status == SUCCESS:
            on_success(i, result)
            assert result.image is not None
            result.image.data = None  # written: free the bytes now

    def blame(i: int) -> None:
        if results[i] is None:
            results[i] = SampleResult("decode_error", "worker process died while processing this image")

    rows = [(i, url) for i, url in enumerate(urls)]
    blocklist_pickle: bytes | None = None
    in_process = False
    if blocklist is not None:
        try:
            blocklist_pickle = pickle.dumps(blocklist, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - any object may be handed in
            log.warning("blocklist %r cannot be pickled (%s): downloading in this process", type(blocklist), exc)
            in_process = True
    if in_process:
        with asyncio.Runner(loop_factory=_make_loop) as runner:
            outcome.retries, outcome.bytes_downloaded = runner.run(_fetch_rows(rows, receive, config, blocklist))
    elif rows:
        processes = max(1, min(worker_count(config), len(rows)))
        for attempt in range(1, WORKER_CRASH_ATTEMPTS + 1):
            crashed = _run_workers(rows, processes, config, blocklist, blocklist_pickle, receive, blame, outcome)
            unfinished = [(i, url) for i, url in rows if results[i] is None]
            if len(unfinished) == len(rows) and crashed == processes:
                raise StageError(f"all {processes} download worker processes died before finishing one row")
            rows = unfinished
            if not rows:
                break
            log.warning("%d worker process(es) died; %d rows unfinished (attempt %d)", crashed, len(rows), attempt)
        for i, _url in rows:
            results[i] = SampleResult(
                "internal_error", f"download worker processes died {WORKER_CRASH_ATTEMPTS} times before this row finished"
            )
    outcome.results = [r if r is not None else SampleResult("internal_error", "no result recorded") for r in results]
    return outcome


def _run_workers(
    rows: list[tuple[int, str | None]],
    processes: int,
    config: DownloadConfig,
    blocklist: Blocklist | None,
    blocklist_pickle: bytes | None,
    receive: Any,
    blame: Any,
    outcome: _RunOutcome,
) -> int:
    """Run one round of workers over ``rows``; returns how many died without finishing."""
    from multiprocessing.connection import wait

    ctx = _mp_context()
    worker_config = per_process_config(config, processes)
    conns: dict[Any, Any] = {}
    in_hand: dict[Any, set[int]] = {}  # per worker: rows whose bytes it holds, unfinished
    procs = []
    try:
        for w in range(processes):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker_main,
                args=(rows[w::processes], worker_config, blocklist_pickle, writer),
                name=f"laion-download-{w}",
                daemon=True,
            )
            proc.start()
            writer.close()  # the child holds the write end: EOF here when it exits
            conns[reader] = proc
            in_hand[reader] = set()
            procs.append(proc)
        finished = 0
        while conns:
            for reader in wait(list(conns)):
                try:
                    messages = reader.recv()
                except EOFError:
                    del conns[reader]
                    reader.close()
                    for i in in_hand.pop(reader):  # only non-empty if it died mid-row
                        blame(i)
                    continue
                for message in messages:
                    if message[0] == "body":
                        in_hand[reader].add(message[1])
                    elif message[0] == "row":
                        in_hand[reader].discard(message[1])
                        receive(message[1], message[2])
                    else:  # ("done", retries, bytes, hash-list matches)
                        finished += 1
                        outcome.retries += message[1]
                        outcome.bytes_downloaded += message[2]
                        counter = getattr(blocklist, "matches", None)
                        if message[3] and hasattr(counter, "update"):
                            counter.update(message[3])
        return processes - finished
    finally:
        for proc in procs:
            if conns:  # left early (an error here): nobody will read what the workers send
                proc.kill()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for reader in conns:
            reader.close()


# -- shard I/O -------------------------------------------------------------------------
def _tar_writer(handle: Any) -> Any:
    """webdataset's writer with a fixed mtime, so re-runs write byte-identical tars."""
    import webdataset

    return webdataset.TarWriter(handle, mtime=TAR_MTIME)


def _write_sample(sink: Any, ext: str, key: str, row: dict[str, Any], caption: str | None, result: SampleResult) -> None:
    """One WebDataset sample: KEY.<ext> image, KEY.txt caption, KEY.json metadata."""
    assert result.image is not None and result.image.data is not None
    sink.write({"__key__": key, ext: result.image.data, "txt": caption or "", "json": _sample_json(key, row, caption, result)})


def _shard_keys(table: pa.Table, shard_uri: str) -> list[str]:
    if "key" in table.column_names:
        keys = table.column("key").to_pylist()
        if any(not k for k in keys) or len(set(keys)) != len(keys):
            raise StageError(f"shard {shard_uri}: column 'key' has empty or duplicate values")
        return [str(k) for k in keys]
    shard = os.path.basename(urlsplit(shard_uri).path).split(".", 1)[0]
    return [sample_key(shard, i) for i in range(table.num_rows)]


def _captions(table: pa.Table, shard_uri: str) -> list[str | None]:
    for name in ("caption", "alt", "TEXT", "text"):
        if name in table.column_names:
            return table.column(name).to_pylist()
    raise StageError(f"shard {shard_uri}: no caption column (expected 'alt' or 'caption')")


def _sample_json(key: str, row: dict[str, Any], caption: str | None, res: SampleResult) -> dict[str, Any]:
    image = res.image
    assert image is not None
    meta = {k: row[k] for k in ("uid", "url", "page_url", "record_date") if k in row}
    return {
        "key": key,
        **meta,
        "caption": caption,
        "status": SUCCESS,
        "width": image.width,
        "height": image.height,
        "original_width": image.original_width,
        "original_height": image.original_height,
        "original_bytes": image.original_bytes,
        "mime_type": image.mime_type,
        "sha256": image.sha256,
        "final_url": res.final_url,
    }


def _result_columns(captions: list[str | None], results: list[SampleResult]) -> dict[str, pa.Array]:
    def img(attr: str) -> list[Any]:
        return [getattr(r.image, attr) if r.image is not None else None for r in results]

    values = {
        "caption": captions,
        "status": [r.status for r in results],
        "error_message": [r.error_message for r in results],
        "width": img("width"),
        "height": img("height"),
        "original_width": img("original_width"),
        "original_height": img("original_height"),
        "original_bytes": [r.image.original_bytes if r.image is not None else None for r in results],
        "mime_type": img("mime_type"),
        "sha256": img("sha256"),
        "final_url": [r.final_url for r in results],
    }
    return {f.name: pa.array(values[f.name], f.type) for f in RESULT_SCHEMA}


def _with_results(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    table = table.drop_columns([c for c in columns if c in table.column_names])
    for name, array in columns.items():
        table = table.append_column(name, array)
    return table


@dataclass
class _RunOutcome:
    results: list[SampleResult]
    retries: int = 0
    bytes_downloaded: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _make_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # uvloop is optional: the stdlib loop is only slower
        return asyncio.new_event_loop()


def _stats_for(results: list[SampleResult], outcome: _RunOutcome, tar_uri: str) -> ShardStats:
    stats = ShardStats(output_uri=tar_uri)
    for r in results:
        stats.add(SUCCESS if r.status == SUCCESS else f"fail:{r.status}")
    stats.extra.update({"retries": outcome.retries, "bytes_downloaded": outcome.bytes_downloaded})
    return stats


def download_shard(
    shard_uri: str,
    tar_uri: str,
    parquet_uri: str,
    config: DownloadConfig,
    blocklist: Blocklist | None = None,
) -> ShardStats:
    """Download every sample of a shard; write the tar, then the Parquet (both atomically).

    Idempotent: a re-run rewrites both objects from scratch. The Parquet is written last,
    so its presence means the shard finished.
    """
    started = time.time()
    table = read_parquet(shard_uri, "shard")
    if "url" not in table.column_names:
        raise StageError(f"shard {shard_uri}: no 'url' column")
    keys = _shard_keys(table, shard_uri)
    captions = _captions(table, shard_uri)
    urls = table.column("url").to_pylist()
    rows = table.select([c for c in ("uid", "url", "page_url", "record_date") if c in table.column_names]).to_pylist()
    ext = config.encode_format
    with storage.atomic_local_path(tar_uri, suffix=".tar") as tmp_tar:
        with open(tmp_tar, "wb") as handle, _tar_writer(handle) as sink:

            def on_success(i: int, result: SampleResult) -> None:
                _write_sample(sink, ext, keys[i], rows[i], captions[i], result)

            outcome = _download_rows(urls, on_success, config, blocklist)
        tar_bytes = os.path.getsize(tmp_tar)
    out = _with_results(table if "key" in table.column_names else table.add_column(0, "key", pa.array(keys)),
                        _result_columns(captions, outcome.results))
    with storage.atomic_local_path(parquet_uri, suffix=".parquet") as tmp:
        pq.write_table(out, tmp, compression="zstd")
    stats = _stats_for(outcome.results, outcome, tar_uri)
    stats.bytes_written = tar_bytes
    elapsed = time.time() - started
    stats.extra["samples_per_s"] = round(len(urls) / elapsed, 2) if elapsed > 0 else None
    stats.extra["parquet_uri"] = parquet_uri
    return stats.done()


def retry_failed(
    shard_uri: str,
    tar_uri: str,
    parquet_uri: str,
    config: DownloadConfig,
    blocklist: Blocklist | None = None,
) -> ShardStats:
    """Re-download only the retryable failures of a finished shard and merge them in.

    Retryable: timeouts, connection errors, 429, 5xx and an unreachable robots.txt.
    Writes a new tar (old members + new successes) and a new Parquet (same rows, same
    order, retried rows updated), each atomically; the Parquet last.
    """
    if not storage.exists(parquet_uri):
        return download_shard(shard_uri, tar_uri, parquet_uri, config, blocklist)
    table = read_parquet(parquet_uri, "download results")
    for name in ("key", "url", "status"):
        if name not in table.column_names:
            raise StageError(f"download results {parquet_uri}: no '{name}' column")
    statuses = table.column("status").to_pylist()
    todo = [i for i, s in enumerate(statuses) if is_retryable(s)]
    keys = [str(k) for k in table.column("key").to_pylist()]
    captions = _captions(table, parquet_uri)
    urls = table.column("url").to_pylist()
    rows = table.select([c for c in ("uid", "url", "page_url", "record_date") if c in table.column_names]).to_pylist()
    old_results = _results_from_table(table)
    ext = config.encode_format
    with storage.local_copy(tar_uri) as old_tar, storage.atomic_local_path(tar_uri, suffix=".tar") as tmp_tar:
        with open(tmp_tar, "wb") as handle, _tar_writer(handle) as sink:
            retried_keys = {keys[i] for i in todo}
            with tarfile.open(old_tar) as old:
                for member in old:  # copy the old samples byte for byte, skipping any retried key
                    if member.name.split(".", 1)[0] in retried_keys:
                        continue
                    extracted = old.extractfile(member)
                    sink.tarstream.addfile(member, extracted)  # webdataset.TarWriter's tarfile

            def on_success(j: int, result: SampleResult) -> None:
                i = todo[j]
                _write_sample(sink, ext, keys[i], rows[i], captions[i], result)

            outcome = _download_rows([urls[i] for i in todo], on_success, config, blocklist)
        tar_bytes = os.path.getsize(tmp_tar)
    merged = list(old_results)
    for j, i in enumerate(todo):
        merged[i] = outcome.results[j]
    out = _with_results(table, _result_columns(captions, merged))
    with storage.atomic_local_path(parquet_uri, suffix=".parquet") as tmp:
        pq.write_table(out, tmp, compression="zstd")
    stats = _stats_for(merged, outcome, tar_uri)
    stats.bytes_written = tar_bytes
    stats.extra.update({"retried": len(todo), "recovered": sum(r.status == SUCCESS for r in outcome.results)})
    stats.extra["parquet_uri"] = parquet_uri
    return stats.done()


def _results_from_table(table: pa.Table) -> list[SampleResult]:
    """Rebuild per-row results from a results Parquet (for merging a retry)."""
    missing = [None] * table.num_rows
    cols = {name: table.column(name).to_pylist() if name in table.column_names else missing for name in RESULT_SCHEMA.names}
    out: list[SampleResult] = []
    for i in range(table.num_rows):
        get = lambda name: cols[name][i]  # noqa: E731
        image = None
        if get("sha256") is not None or get("original_width") is not None or get("width") is not None:
            image = ImageResult(
                status=get("status"),
                width=get("width"),
                height=get("height"),
                original_width=get("original_width"),
                original_height=get("original_height"),
                original_bytes=get("original_bytes") or 0,
                mime_type=get("mime_type"),
                sha256=get("sha256"),
            )
        out.append(SampleResult(get("status"), get("error_message"), get("final_url"), image))
    return out
