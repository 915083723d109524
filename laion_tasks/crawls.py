"""Which Common Crawl snapshot to process: ``collinfo.json`` lists every crawl with its dates."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from laion_tasks import storage

CRAWL_ID = re.compile(r"^CC-MAIN-(\d{4})-(\d{2})$")


def fetch_collinfo(uri: str) -> list[dict[str, Any]]:
    data = json.loads(storage.read_bytes(uri))
    if not isinstance(data, list):
        raise ValueError(f"{uri}: expected a JSON list of crawls, got {type(data).__name__}")
    return data


def crawl_release_date(entry: dict[str, Any]) -> dt.datetime:
    """The crawl's end date (``to``); crawls are published shortly after they end."""
    raw = entry.get("to") or entry.get("from")
    if not raw:
        raise ValueError(f"collinfo entry {entry.get('id')!r} has no 'to'/'from' date")
    when = dt.datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def newest_crawl_before(collinfo: list[dict[str, Any]], when: dt.datetime) -> str:
    """The id of the newest CC-MAIN crawl whose end date is before ``when``."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    candidates = [
        (crawl_release_date(e), e["id"]) for e in collinfo if CRAWL_ID.match(str(e.get("id", ""))) and crawl_release_date(e) < when
    ]
    if not candidates:
        raise LookupError(f"no Common Crawl snapshot released before {when.isoformat()} in collinfo")
    return max(candidates)[1]
