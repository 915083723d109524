"""TDMRep (W3C TDM Reservation Protocol): the ``tdm-reservation`` header and the origin's
``/.well-known/tdmrep.json``.

The JSON file is an array of rules ``{"location": PATTERN, "tdm-reservation": 0|1,
"tdm-policy": URL}``; ``location`` uses robots.txt path patterns (``*`` any run of
characters, a final ``$`` anchors the end). The first rule whose pattern matches the
path (with its query) applies. A reservation (``1``) means text-and-data-mining rights are
reserved, and we do not download. A missing file (4xx), an unreachable one, or one that is
not a JSON array of rules means "nothing reserved by the file": the header still counts.
The file is fetched once per origin and kept for a TTL.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from laion_tasks.net.origin_cache import OriginCache
from laion_tasks.net.robots import origin_of, read_capped

TDMREP_PATH = "/.well-known/tdmrep.json"
TDMREP_MAX_BYTES = 512 * 1024


def header_reserved(value: str | None) -> bool:
    """``tdm-reservation: 1`` on a response."""
    return (value or "").strip() == "1"


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A robots.txt-style path pattern as an anchored regex: ``*`` is any run, a final ``$`` ends the path."""
    anchored = pattern.endswith("$")
    body = pattern[:-1] if anchored else pattern
    return re.compile("".join(".*" if c == "*" else re.escape(c) for c in body) + ("$" if anchored else ""), re.S)


@dataclass(frozen=True)
class TdmRule:
    location: str
    reserved: bool
    policy: str | None
    regex: re.Pattern[str]

    def matches(self, path: str) -> bool:
        return self.regex.match(path) is not None


@dataclass(frozen=True)
class TdmRules:
    rules: tuple[TdmRule, ...] = ()
    note: str | None = None
    """Why no rules were read (not found, unreachable, malformed), for the log."""

    def rule_for(self, url: str) -> TdmRule | None:
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return next((rule for rule in self.rules if rule.matches(path)), None)

    def reserves(self, url: str) -> TdmRule | None:
        rule = self.rule_for(url)
        return rule if rule is not None and rule.reserved else None

    def reserves_everything(self) -> bool:
        """The first rule covers every path and reserves: the origin's other URLs need no request."""
        return bool(self.rules) and self.rules[0].reserved and self.rules[0].location in ("/", "/*", "*", "")


def parse_tdmrep(body: bytes) -> TdmRules:
    try:
        doc = json.loads(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        return TdmRules(note=f"tdmrep.json is not JSON: {exc}")
    if not isinstance(doc, list):
        return TdmRules(note="tdmrep.json is not a JSON array of rules")
    rules = []
    for entry in doc:
        if not isinstance(entry, dict) or not isinstance(entry.get("location"), str):
            continue
        location = entry["location"].strip()
        if location and not location.startswith(("/", "*")):
            location = "/" + location
        reserved = entry.get("tdm-reservation") in (1, "1", True)
        policy = entry.get("tdm-policy") if isinstance(entry.get("tdm-policy"), str) else None
        rules.append(TdmRule(location, reserved, policy, _pattern_regex(location or "/")))
    return TdmRules(tuple(rules))


class TdmRepCache:
    """``/.well-known/tdmrep.json`` once per origin (through the caller's hop check), kept ``ttl_s``."""

    def __init__(self, session: Any, check_hop: Callable[[str], None], deadline_s: float, ttl_s: float) -> None:
        self.session = session
        self.check_hop = check_hop
        self.deadline_s = deadline_s
        self._cache: OriginCache[TdmRules] = OriginCache(self._load, ttl_s)

    def close(self) -> None:
        self._cache.close()

    async def rules(self, url: str) -> TdmRules:
        return await self._cache.get(origin_of(url))

    async def _load(self, origin: str) -> TdmRules:
        url = origin + TDMREP_PATH
        try:
            self.check_hop(url)
            async with asyncio.timeout(self.deadline_s):
                # No redirects: the file belongs to this origin.
                async with self.session.get(url, allow_redirects=False) as resp:
                    if resp.status != 200:
                        return TdmRules(note=f"tdmrep.json answered HTTP {resp.status}")
                    return parse_tdmrep(await read_capped(resp, TDMREP_MAX_BYTES))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - unreachable: the file reserves nothing; the header still counts
            return TdmRules(note=f"tdmrep.json not fetched: {type(exc).__name__}: {str(exc)[:200]}")
