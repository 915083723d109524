"""The HTTP client of the download stage: one polite, guarded fetch per URL.

Per event loop, a global concurrency limit and a per-host one, a total deadline per
attempt (redirects and body included, waiting for the first slot excluded), retries with
exponential backoff and jitter on timeouts, connection errors, 429 (Retry-After honoured
up to ``backoff_max_s``) and 5xx. Redirects are followed by hand so every hop is re-checked.

Checks, in order, for every hop: URL hash list, SSRF guard, origins that opted out
host-wide (:class:`~.optout.HostOptOuts`, no request), robots.txt (RFC 9309,
:mod:`laion_tasks.net.robots`), its AI-use preferences (``Content-Usage``, ``Content-Signal``:
:mod:`laion_tasks.net.usage_prefs`), tdmrep.json (:mod:`laion_tasks.net.tdmrep`). Then, on the
response: ``X-Robots-Tag``, ``tdm-reservation``, ``Content-Usage`` and ``Content-Signal`` headers
before the body; the body size capped while streaming. On the bytes, before anything is
decoded or written: the image hash list, then opt-outs embedded in the image (XMP / C2PA,
:mod:`.optout`). Every failure becomes one status string (see :func:`is_retryable` for which
ones are retried). A use in ``download.usage_pref_refuse`` that the publisher refuses is the
status ``opted_out_<use>`` (``opted_out_ai_train``), the outcome ``opted_out:<use>``.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import random
import time
from dataclasses import dataclass
from typing import Any, Iterable, Protocol
from urllib.parse import urljoin, urlsplit

from laion_tasks.config import DownloadConfig
from laion_tasks.net import ssrf
from laion_tasks.net.origin_cache import SharedOriginStore
from laion_tasks.net.robots import ROBOTS_MAX_BYTES, RobotsCache, user_agent_token  # noqa: F401 - re-exported
from laion_tasks.net.tdmrep import TdmRepCache, header_reserved
from laion_tasks.net.usage_prefs import OUTCOME_NAMES, UsagePref, combine, header_pref
from laion_tasks.stages.download import optout
from laion_tasks.stages.image_ops import ImageResult

SUCCESS = "success"
RETRYABLE_STATUSES = frozenset({"timeout", "connection_error", "http_429", "robots_txt_unavailable"})
"""Plus every ``http_5xx``: see :func:`is_retryable`."""
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
KNOWN_DIRECTIVES_WITH_COLON = ("unavailable_after", "max-snippet", "max-image-preview", "max-video-preview")
USAGE_REFUSAL_STATUSES = {f"opted_out_{name}": f"opted_out:{name}" for name in OUTCOME_NAMES.values()}
"""Status of a sample whose publisher refuses a use in ``download.usage_pref_refuse`` -> its lineage outcome."""


def usage_refusal_status(use: str) -> str:
    return f"opted_out_{OUTCOME_NAMES[use]}"


class Blocklist(Protocol):
    """Safety hash lists (implemented by ``laion_tasks.hashlists.HashLists``).

    ``url_blocked`` is asked BEFORE any request to a URL (every redirect hop too), so a
    listed URL is never fetched; ``image_blocked`` is asked on the original bytes right
    after the fetch (with their sha256, computed once per body), and a listed image is
    never decoded nor written anywhere. An optional
    ``pdq_blocked(image)`` (with a ``pdq`` list) is asked on the decoded image before the
    resize (see ``workers.pdq_inspector``).
    """

    def url_blocked(self, url: str) -> bool: ...

    def image_blocked(self, data: bytes, sha256: bytes | None = None) -> bool: ...


def is_retryable(status: str | None) -> bool:
    return bool(status) and (status in RETRYABLE_STATUSES or (status.startswith("http_5") and len(status) == 8))


@dataclass
class SampleResult:
    status: str
    error_message: str | None = None
    final_url: str | None = None
    image: ImageResult | None = None
    usage_pref: UsagePref | None = None
    """The AI-use preferences found for the sample (robots.txt of every hop, the response's headers)."""


class _Failure(Exception):
    """One attempt failed with a status; ``retry_after`` comes from a 429/503 header."""

    def __init__(self, status: str, message: str, url: str | None = None, retry_after: float | None = None,
                 usage_pref: UsagePref | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.url = url
        self.retry_after = retry_after
        self.usage_pref = usage_pref


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

    def __init__(
        self, config: DownloadConfig, blocklist: Blocklist | None = None, origin_store: SharedOriginStore | None = None
    ) -> None:
        """``origin_store``: the task's shared robots.txt / tdmrep.json answers (see
        :mod:`laion_tasks.net.origin_cache`); without one, they are cached in this loop only."""
        import aiohttp

        self.config = config
        self.blocklist = blocklist
        self.ua_token = user_agent_token(config.user_agent)
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self._host_slots: dict[str, asyncio.Semaphore] = {}
        self.host_opt_outs = optout.HostOptOuts()
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
        deadline, ttl = config.request_deadline_s, config.opt_out_cache_ttl_s
        self.robots = RobotsCache(self.session, self._check_hop, deadline, ttl, _classify_client_error, origin_store)
        self.tdmrep = TdmRepCache(self.session, self._check_hop, deadline, ttl, origin_store)

    async def close(self) -> None:
        self.robots.close()
        self.tdmrep.close()
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

    # -- opt-outs before a request -------------------------------------------------------
    def _refuse_usage(self, pref: UsagePref | None, url: str) -> None:
        """Raise the refusal of the first use in ``download.usage_pref_refuse`` that ``pref`` disallows."""
        refused = pref.refused(self.config.usage_pref_refuse) if pref is not None else []
        if refused:
            assert pref is not None
            why = "; ".join(pref.sources)
            raise _Failure(usage_refusal_status(refused[0]), f"{refused[0]} refused: {why}", url, usage_pref=pref)

    async def _check_opt_outs(self, url: str) -> UsagePref | None:
        """Host-wide opt-outs already known, then robots.txt and the AI-use preferences it attaches to ``url``
        (returned), then tdmrep.json (per origin, from the task's store)."""
        config = self.config
        known = self.host_opt_outs.check(url)
        if known is not None:
            raise _Failure(known[0], known[1], url)
        rules = await self.robots.rules(url) if config.respect_robots_txt or config.respect_usage_prefs else None
        if config.respect_robots_txt:
            assert rules is not None
            if rules.unavailable is not None:
                self.host_opt_outs.record(url, rules.status, rules.unavailable)
                raise _Failure(rules.status, rules.unavailable, url)
            if not rules.allows(url, self.ua_token):
                reason = f"robots.txt disallows {urlsplit(url).path or '/'} for {self.ua_token}"
                if rules.disallows_everything(self.ua_token):
                    self.host_opt_outs.record(url, "opted_out_robots_txt", f"robots.txt disallows everything for {self.ua_token}")
                raise _Failure("opted_out_robots_txt", reason, url)
        pref = None
        if config.respect_usage_prefs and rules is not None:
            pref = rules.usage_pref(url, self.ua_token, config.usage_pref_reading)
            self._refuse_usage(pref, url)
        if config.respect_tdm_reservation:
            tdm = await self.tdmrep.rules(url)
            rule = tdm.reserves(url)
            if rule is not None:
                reason = f"tdmrep.json reserves {rule.location!r}" + (f" (policy {rule.policy})" if rule.policy else "")
                if tdm.reserves_everything():
                    self.host_opt_outs.record(url, "opted_out_tdm_reservation", reason)
                raise _Failure("opted_out_tdm_reservation", reason, url)
        return pref

    # -- one URL ----------------------------------------------------------------------
    async def fetch(self, url: str, process: Any, on_body: Any = None) -> SampleResult:
        """Fetch ``url`` with retries and hand the bytes to ``process`` (async callable).

        ``on_body()`` is called once the body is in, before any work on the bytes. ``process(data, final_url,
        sha256)`` gets the body's sha256, computed here once (the hash list and the parquet both use it).
        """
        attempt = 0
        while True:
            async with self.slots:
                try:
                    data, final_url, usage = await self._attempt(url)
                except _Failure as failure:
                    # robots.txt results are cached per origin: retrying now cannot change them.
                    final = failure.status == "robots_txt_unavailable" or not is_retryable(failure.status)
                    if final or attempt >= self.config.retries:
                        return SampleResult(failure.status, failure.message, failure.url, usage_pref=failure.usage_pref)
                    delay = self._backoff(attempt, failure)
                    if delay is None:
                        return SampleResult(
                            failure.status, f"{failure.message}; Retry-After exceeds backoff_max_s", failure.url
                        )
                else:
                    if on_body is not None:
                        on_body()
                    digest = hashlib.sha256(data).digest()
                    if self.blocklist is not None and self.blocklist.image_blocked(data, sha256=digest):
                        return SampleResult("blocked_hashlist", "image bytes are on a safety hash list; not stored")
                    if self.config.respect_embedded_optouts:
                        refusal = optout.embedded_opt_out(data, self.config.embedded_optout_dmi_values)
                        if refusal is not None:
                            return SampleResult(optout.STATUS, refusal, final_url, usage_pref=usage)
                    result = await process(data, final_url, digest.hex())
                    if result.status != "blocked_hashlist":  # nothing of a listed image is kept
                        result.usage_pref = usage
                    return result
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

    async def _attempt(self, url: str) -> tuple[bytes, str, UsagePref | None]:
        """The body, the URL that served it, and the AI-use preferences of every hop's robots.txt and of the
        response combined (most restrictive: draft-ietf-aipref-vocab-07 §5.1)."""
        config = self.config
        seen = {url}
        current = url
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        hop_prefs: list[UsagePref | None] = []
        for hop in range(config.max_redirects + 1):
            self._check_hop(current)
            hop_prefs.append(await self._check_opt_outs(current))
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
                    location = await self._request(current, combine(hop_prefs))
            except TimeoutError:
                raise _Failure("timeout", f"no complete response within {config.request_deadline_s}s", current) from None
            except _Failure:
                raise
            except Exception as exc:  # noqa: BLE001 - aiohttp raises many types
                status, message = _classify_client_error(exc)
                raise _Failure(status, message, current) from None
            finally:
                host_slot.release()
            if isinstance(location, tuple):
                return location[0], current, location[1]
            if location in seen:
                raise _Failure("redirect_loop", f"redirect loop after {hop + 1} hops", location)
            seen.add(location)
            current = location
        raise _Failure("too_many_redirects", f"more than max_redirects={config.max_redirects} redirects", current)

    async def _request(self, url: str, robots_pref: UsagePref | None) -> tuple[bytes, UsagePref | None] | str:
        """One GET: the body bytes with the AI-use preferences (``robots_pref``, the robots.txt ones of the hops
        so far, and the response's), or the absolute URL a redirect points to."""
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
            if config.respect_tdm_reservation and header_reserved(resp.headers.get("tdm-reservation")):
                raise _Failure("opted_out_tdm_reservation", "tdm-reservation: 1", url)
            usage = robots_pref
            if config.respect_usage_prefs:
                usage = combine([robots_pref, header_pref(resp.headers.getall("Content-Usage", []),
                                                          resp.headers.getall("Content-Signal", []),
                                                          config.usage_pref_reading)])
                self._refuse_usage(usage, url)
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
            return b"".join(chunks), usage


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
