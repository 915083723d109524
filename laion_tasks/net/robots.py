"""robots.txt per RFC 9309, fetched once per origin and cached with a TTL.

Matching is Scrapy's ``protego`` (RFC 9309: the group for our product token, else ``*``;
``*`` and ``$`` in paths; the longest match wins, Allow over Disallow on a tie). Fetching
follows the RFC's error handling:

* 2xx: the rules in the body, read whole up to :data:`ROBOTS_MAX_BYTES` (500 KiB, the
  minimum the RFC asks a crawler to parse), however many TCP segments it comes in;
* up to 5 redirects are followed (each hop through the caller's SSRF / hash-list check);
  more means "no rules";
* 4xx, 401 and 403 included: no rules, everything is allowed;
* 5xx, 429 and an unreachable server: everything is disallowed (``robots_txt_unavailable``).

The body is UTF-8 (RFC 9309 §2.3); a leading byte-order mark is dropped, else the first
line (often ``User-agent: *``) would not parse and every rule of its group would be lost.

The product token is taken from the user agent string (``laion-tasks/0.1 (+URL)`` ->
``laion-tasks``), as ``X-Robots-Tag: <token>:`` prefixes are.

Caching: a definitive answer is kept ``ttl_s`` (``download.opt_out_cache_ttl_s``), an
unavailable robots.txt at most :data:`~laion_tasks.net.origin_cache.TRANSIENT_TTL_S`; with a
:class:`~laion_tasks.net.origin_cache.SharedOriginStore` the answer is shared by every worker
process and shard of the task.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

from laion_tasks.net.origin_cache import TRANSIENT_TTL_S, OriginCache, Record, SharedOriginStore, fetch_shared
from laion_tasks.net.usage_prefs import Reading, RobotsUsage, UsagePref, parse_robots_usage

ROBOTS_MAX_BYTES = 500 * 1024
"""RFC 9309: crawlers must parse at least 500 KiB; we read no more."""
MAX_ROBOTS_REDIRECTS = 5
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


def user_agent_token(user_agent: str) -> str:
    """The product token robots rules and ``X-Robots-Tag: <ua>:`` prefixes refer to."""
    return user_agent.split("/", 1)[0].strip().lower()


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


@dataclass(frozen=True)
class RobotsRules:
    """What one origin's robots.txt says to our token. ``parser`` None with ``allow_all``: no rules."""

    parser: Any = None
    allow_all: bool = False
    unavailable: str | None = None
    """Why robots.txt could not be had (5xx, 429, unreachable): then everything is disallowed."""
    status: str = "robots_txt_unavailable"
    """The status an unavailable robots.txt gives (``blocked_ssrf`` when the guard refused the host)."""
    expires_at: float = math.inf
    """When this answer must be asked again (a ``time.time()``)."""
    usage: RobotsUsage = field(default_factory=RobotsUsage)
    """Its AI-use preference lines (``Content-Usage``, ``Content-Signal``, RSL ``License``): parsed with the
    rules, so the per-origin answer carries them (:mod:`laion_tasks.net.usage_prefs`)."""

    def usage_pref(self, url: str, token: str, reading: Reading) -> UsagePref | None:
        """The AI-use preferences robots.txt attaches to ``url`` for ``token``: the rules of the group protego
        chose for the token (draft-ietf-aipref-attach-05 §3.1), and the RSL license URLs."""
        if not self.usage.rules and not self.usage.licenses:
            return None
        rule_set = self.parser._get_matching_rule_set(token) if self.parser is not None else None
        return self.usage.pref_for(url, getattr(rule_set, "user_agent", None), reading)

    def allows(self, url: str, token: str) -> bool:
        if self.unavailable is not None:
            return False
        if self.allow_all or self.parser is None:
            return True
        return bool(self.parser.can_fetch(url, token))

    def disallows_everything(self, token: str) -> bool:
        """True when no URL of the origin may be fetched by ``token``: unavailable, or a group
        with ``Disallow: /`` (or ``/*``) and no Allow. Used to answer the origin's other URLs
        without asking anything."""
        if self.unavailable is not None:
            return True
        if self.allow_all or self.parser is None or self.parser.can_fetch("/", token):
            return False
        rule_set = self.parser._get_matching_rule_set(token)  # protego has no public view of a group
        rules = getattr(rule_set, "_rules", None)
        if rules is None:
            return False
        disallow_all = any(r.field == "disallow" and getattr(r.value, "_pattern", None) in ("/", "/*") for r in rules)
        return disallow_all and not any(r.field == "allow" for r in rules)


def decode_robots(body: bytes) -> str:
    """The text of a robots.txt body: UTF-8, without a byte-order mark (``utf-8-sig``)."""
    return body.decode("utf-8-sig", errors="replace")


def parse_robots(body: bytes) -> RobotsRules:
    return rules_from_record({"body": decode_robots(body)})


def rules_from_record(record: Record, expires_at: float = math.inf) -> RobotsRules:
    """The rules a stored record (see :meth:`RobotsCache._fetch`) stands for."""
    if record.get("unavailable") is not None:
        return RobotsRules(unavailable=str(record["unavailable"]), status=str(record.get("status") or "robots_txt_unavailable"),
                           expires_at=expires_at)
    if record.get("body") is None:
        return RobotsRules(allow_all=True, expires_at=expires_at)
    from protego import Protego

    body = str(record["body"])
    return RobotsRules(parser=Protego.parse(body), expires_at=expires_at, usage=parse_robots_usage(body))


async def read_capped(resp: Any, limit: int) -> bytes:
    """The whole body up to ``limit`` bytes: ``StreamReader.read(n)`` alone returns only what
    is buffered, which loses the rules of a robots.txt that arrives in several segments."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        chunks.append(chunk[: limit - size])
        size += len(chunks[-1])
        if size >= limit:
            break
    return b"".join(chunks)


class RobotsCache:
    """One robots.txt fetch per origin (concurrent askers share it), kept until its answer expires.

    ``check_hop(url)`` is the caller's guard for every URL sent a request (SSRF, hash
    list); it raises to refuse one, and a refused robots.txt counts as unreachable.
    With ``store``, the answer is fetched once for every process of the task that shares it.
    """

    def __init__(
        self,
        session: Any,
        check_hop: Callable[[str], None],
        deadline_s: float,
        ttl_s: float,
        classify: Callable[[BaseException], tuple[str, str]],
        store: SharedOriginStore | None = None,
    ) -> None:
        self.session = session
        self.check_hop = check_hop
        self.deadline_s = deadline_s
        self.ttl_s = ttl_s
        self.classify = classify
        self.store = store
        self._cache: OriginCache[RobotsRules] = OriginCache(self._load, ttl_s, expires_at=lambda r: r.expires_at)

    def close(self) -> None:
        self._cache.close()

    async def rules(self, url: str) -> RobotsRules:
        return await self._cache.get(origin_of(url))

    async def _load(self, origin: str) -> RobotsRules:
        record, expires_at = await fetch_shared(
            self.store, "robots", origin, lambda: self._fetch(origin), lock_wait_s=2 * self.deadline_s + 5
        )
        return rules_from_record(record, expires_at)

    def _no_rules(self) -> tuple[Record, float]:
        return {}, self.ttl_s

    def _unavailable(self, why: str, status: str = "robots_txt_unavailable") -> tuple[Record, float]:
        """Everything disallowed, asked again after at most TRANSIENT_TTL_S: a 503 minute must not decide a task."""
        return {"unavailable": why, "status": status}, min(self.ttl_s, TRANSIENT_TTL_S)

    async def _fetch(self, origin: str) -> tuple[Record, float]:
        """The record for ``origin`` (``{"body": text}``, ``{}`` for no rules, ``{"unavailable": why,
        "status": s}``) and how long it may be reused."""
        url = f"{origin}/robots.txt"
        try:
            async with asyncio.timeout(self.deadline_s):
                for _hop in range(MAX_ROBOTS_REDIRECTS + 1):
                    self.check_hop(url)
                    async with self.session.get(url, allow_redirects=False) as resp:
                        if resp.status in REDIRECT_CODES and resp.headers.get("Location"):
                            url = urljoin(url, resp.headers["Location"])
                            continue
                        if resp.status >= 500 or resp.status == 429:
                            return self._unavailable(f"robots.txt answered HTTP {resp.status}")
                        if resp.status >= 400:
                            return self._no_rules()  # RFC 9309 2.3.1.3: 4xx (401/403 too) = no rules
                        if resp.status >= 300:
                            return self._no_rules()  # a redirect without Location leads nowhere
                        return {"body": decode_robots(await read_capped(resp, ROBOTS_MAX_BYTES))}, self.ttl_s
                return self._no_rules()  # RFC 9309 2.3.1.2: more than 5 redirects = no rules
        except TimeoutError:
            return self._unavailable("robots.txt fetch timed out")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to get it means "unreachable": disallow all
            refusal = getattr(exc, "status", None), getattr(exc, "message", None)
            if refusal[0] and refusal[1]:
                return self._unavailable(f"robots.txt not fetched: {refusal[0]}: {refusal[1]}")
            status, message = self.classify(exc)
            if status == "blocked_ssrf":  # the host itself is refused: say so, as for the image
                return self._unavailable(message, status)
            return self._unavailable(f"robots.txt unreachable: {status}: {message}")
