"""TDMRep (W3C TDM Reservation Protocol, Final Community Group Report, 10 May 2024): the
``tdm-reservation`` header and the origin's ``/.well-known/tdmrep.json``.

The JSON file is an array of rules ``{"location": PATTERN, "tdm-reservation": 0|1,
"tdm-policy": URL}``. A reservation (``1``) means text-and-data-mining rights are reserved,
and we do not download. A missing file (4xx), an unreachable one, or one that is not a JSON
array of rules means "nothing reserved by the file": the header still counts. Redirects to
the file are followed (each hop through the caller's guard), as the report's "TDM File on
the Origin Server" section allows.

Matching follows the report's section "TDM File on the Origin Server" (``#sec-tdm-file``)
and its subsection "Use of regular expressions" (``#sec-tdm-file-regexp``):

* ``location`` is "a pattern matching the path of a set of files hosted on the server": it is
  matched against the URL's **path**. The query string names no other file, so
  ``/*.png$`` reserves ``/a.png?v=2`` too. (A pattern that itself contains ``?`` cannot match
  a path; it is matched against path and query, so what such a publisher wrote still counts.)
* the match is anchored at the start of the path, case sensitive; ``*`` is any run of
  characters, a final ``$`` ends the pattern; "the most specific match is the first in
  sequence": the first matching rule decides; no match means ``tdm-reservation`` is unset;
* percent-encoded unreserved characters (RFC 3986) are decoded before comparing, other
  escapes compared with upper-case hex; a ``$`` or ``*`` meant literally is written ``%24`` /
  ``%2A`` in the pattern (``/path/foo-%24`` matches ``/path/foo-$``).

The answer is kept ``ttl_s`` (a transient failure at most
:data:`~laion_tasks.net.origin_cache.TRANSIENT_TTL_S`), shared through a
:class:`~laion_tasks.net.origin_cache.SharedOriginStore` when there is one.
"""

from __future__ import annotations

import asyncio
import json
import math
import string
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

from laion_tasks.net.origin_cache import TRANSIENT_TTL_S, OriginCache, Record, SharedOriginStore, fetch_shared
from laion_tasks.net.robots import MAX_ROBOTS_REDIRECTS, REDIRECT_CODES, origin_of, read_capped

TDMREP_PATH = "/.well-known/tdmrep.json"
TDMREP_MAX_BYTES = 512 * 1024

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_AS_IS = _UNRESERVED | frozenset("/:@!&'()+,;=?")
"""Characters compared as written: unreserved, and the reserved ones a path or query holds, but for
``$`` and ``*``, which are special in a pattern and so compared as ``%24`` / ``%2A``."""
_HEX = frozenset(string.hexdigits)


def header_reserved(value: str | None) -> bool:
    """``tdm-reservation: 1`` on a response."""
    return (value or "").strip() == "1"


def canonical(text: str) -> str:
    """``text`` (a path, or a literal run of a pattern) with one spelling per character: escaped
    unreserved characters decoded, other escapes in upper-case hex, everything else that is not
    compared as written (``$``, ``*``, spaces, non-ASCII) percent-encoded as UTF-8."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "%" and i + 2 < len(text) and text[i + 1] in _HEX and text[i + 2] in _HEX:
            decoded = chr(int(text[i + 1 : i + 3], 16))
            out.append(decoded if decoded in _UNRESERVED else "%" + text[i + 1 : i + 3].upper())
            i += 3
            continue
        out.append(c if c in _AS_IS else "".join(f"%{b:02X}" for b in c.encode("utf-8")))
        i += 1
    return "".join(out)


def _glob_match(pattern: list[str | None], anchored: bool, path: str) -> bool:
    """Prefix match of ``pattern`` (literal characters, None for ``*``) against ``path``; ``anchored``:
    the path must end where the pattern does. Linear in the pattern times the path (no backtracking,
    as in Google's robots.txt matcher), so a hostile file cannot stall a worker."""
    positions = [0]
    for token in pattern:
        if token is None:
            positions = list(range(positions[0], len(path) + 1))
            continue
        positions = [p + 1 for p in positions if p < len(path) and path[p] == token]
        if not positions:
            return False
    return len(path) in positions if anchored else True


@dataclass(frozen=True)
class TdmRule:
    location: str
    reserved: bool
    policy: str | None

    @cached_property
    def _compiled(self) -> tuple[list[str | None], bool]:
        """The location as tokens (canonical literal characters; None for ``*``) and whether it ends with ``$``."""
        location = self.location or "/"
        anchored = location.endswith("$")
        body = location[:-1] if anchored else location
        tokens: list[str | None] = []
        for n, literal in enumerate(body.split("*")):
            if n:
                tokens.append(None)
            tokens.extend(canonical(literal))
        return tokens, anchored

    def matches(self, url: str) -> bool:
        """Whether the rule's ``location`` covers ``url`` (an absolute URL, or a path)."""
        parts = urlsplit(url)
        target = parts.path or "/"
        if "?" in self.location and parts.query:
            target += "?" + parts.query
        tokens, anchored = self._compiled
        return _glob_match(tokens, anchored, canonical(target))


@dataclass(frozen=True)
class TdmRules:
    rules: tuple[TdmRule, ...] = ()
    note: str | None = None
    """Why no rules were read (not found, unreachable, malformed), for the log."""
    expires_at: float = math.inf
    """When this answer must be asked again (a ``time.time()``)."""

    def rule_for(self, url: str) -> TdmRule | None:
        """The first rule whose location matches ``url``; None: ``tdm-reservation`` is unset."""
        return next((rule for rule in self.rules if rule.matches(url)), None)

    def reserves(self, url: str) -> TdmRule | None:
        rule = self.rule_for(url)
        return rule if rule is not None and rule.reserved else None

    def reserves_everything(self) -> bool:
        """The first rule covers every path and reserves: the origin's other URLs need no request."""
        return bool(self.rules) and self.rules[0].reserved and self.rules[0].location in ("/", "/*", "*", "")


def _rules_record(body: bytes) -> Record:
    """The stored form of a tdmrep.json body: ``{"rules": [[location, reserved, policy], ...]}`` or ``{"note": why}``."""
    try:
        doc = json.loads(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        return {"note": f"tdmrep.json is not JSON: {exc}"}
    if not isinstance(doc, list):
        return {"note": "tdmrep.json is not a JSON array of rules"}
    rules = []
    for entry in doc:
        if not isinstance(entry, dict) or not isinstance(entry.get("location"), str):
            continue
        location = entry["location"].strip()
        if location and not location.startswith(("/", "*")):
            location = "/" + location
        reserved = entry.get("tdm-reservation") in (1, "1", True)
        policy = entry.get("tdm-policy") if isinstance(entry.get("tdm-policy"), str) else None
        rules.append([location, reserved, policy])
    return {"rules": rules}


def rules_from_record(record: Record, expires_at: float = math.inf) -> TdmRules:
    rules = tuple(TdmRule(str(loc), bool(res), pol) for loc, res, pol in record.get("rules") or ())
    return TdmRules(rules, record.get("note"), expires_at)


def parse_tdmrep(body: bytes) -> TdmRules:
    return rules_from_record(_rules_record(body))


class TdmRepCache:
    """``/.well-known/tdmrep.json`` once per origin (through the caller's hop check), kept until it expires;
    with ``store``, once for every process of the task that shares it."""

    def __init__(
        self,
        session: Any,
        check_hop: Callable[[str], None],
        deadline_s: float,
        ttl_s: float,
        store: SharedOriginStore | None = None,
    ) -> None:
        self.session = session
        self.check_hop = check_hop
        self.deadline_s = deadline_s
        self.ttl_s = ttl_s
        self.store = store
        self._cache: OriginCache[TdmRules] = OriginCache(self._load, ttl_s, expires_at=lambda r: r.expires_at)

    def close(self) -> None:
        self._cache.close()

    async def rules(self, url: str) -> TdmRules:
        return await self._cache.get(origin_of(url))

    async def _load(self, origin: str) -> TdmRules:
        record, expires_at = await fetch_shared(
            self.store, "tdmrep", origin, lambda: self._fetch(origin), lock_wait_s=2 * self.deadline_s + 5
        )
        return rules_from_record(record, expires_at)

    async def _fetch(self, origin: str) -> tuple[Record, float]:
        transient = min(self.ttl_s, TRANSIENT_TTL_S)
        url = origin + TDMREP_PATH
        try:
            async with asyncio.timeout(self.deadline_s):
                for _hop in range(MAX_ROBOTS_REDIRECTS + 1):
                    self.check_hop(url)
                    async with self.session.get(url, allow_redirects=False) as resp:
                        if resp.status in REDIRECT_CODES and resp.headers.get("Location"):
                            url = urljoin(url, resp.headers["Location"])
                            continue
                        if resp.status == 200:
                            return _rules_record(await read_capped(resp, TDMREP_MAX_BYTES)), self.ttl_s
                        note = {"note": f"tdmrep.json answered HTTP {resp.status}"}
                        return note, transient if resp.status >= 500 or resp.status == 429 else self.ttl_s
                return {"note": f"tdmrep.json: more than {MAX_ROBOTS_REDIRECTS} redirects"}, self.ttl_s
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return {"note": "tdmrep.json fetch timed out"}, transient
        except Exception as exc:  # noqa: BLE001 - unreachable: the file reserves nothing; the header still counts
            return {"note": f"tdmrep.json not fetched: {type(exc).__name__}: {str(exc)[:200]}"}, transient
