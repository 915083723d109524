"""Link rules of extract: which image references are valid URLs, how they resolve against the page,
and the columns and ids of a candidate."""

from __future__ import annotations

import hashlib
import logging
import operator
import re
from urllib.parse import urljoin, urlsplit



log = logging.getLogger(__name__)

_PATH_OF = operator.attrgetter("path")
_ALT_OF = operator.attrgetter("alt")
_URL_OF = operator.attrgetter("url")
CRAWL_ID_RE = re.compile(r"^CC-MAIN-(\d{4})-(\d{2})$")
COLUMNS = ("uid", "url", "alt", "page_url", "wat_file", "record_date", "record_id")
MAX_LOGGED_BAD_RECORDS = 20
"""Per file, the first N bad records are logged one by one; the rest only in the summary."""
_NEEDS_URLJOIN = re.compile(r"[\[\]\t\r\n]|\?#")
"""In a whole reference, what urljoin would rewrite (empty query, stripped tabs, IPv6 hosts)."""
_PATH_NEEDS_URLJOIN = re.compile(r";|/\.")
"""In the path part, what urljoin would rewrite (dot segments, empty params)."""
_PATH_PART = re.compile(r"[^?#]*")




def candidate_uid(url: str, alt: str) -> str:
    """Stable id of an (url, alt) pair: the first 16 bytes of sha256(url NUL alt), as hex."""
    return hashlib.sha256(f"{url}\x00{alt}".encode("utf-8", "surrogatepass")).hexdigest()[:32]



def _valid_url(url: str) -> bool:
    """Parsable, with a host: checked once per new pair, so its cost does not matter."""
    try:
        return bool(urlsplit(url).hostname)
    except ValueError:
        return False


class _Resolver:
    """Resolves relative URLs against one page's base URL exactly like ``urljoin``.

    The three common forms (``//host/path``, ``/path`` and ``path`` relative to the base's
    directory, without dot segments, empty query or params) are joined by string
    concatenation, which gives urljoin's result at a fraction of its cost; everything
    else goes through urljoin. Returns "" when the URL cannot be parsed.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.scheme = ""
        self.origin = ""
        self.directory = ""
        if base_url.startswith(("http://", "https://")):
            try:
                parts = urlsplit(base_url)
            except ValueError:
                return
            if parts.netloc:
                self.scheme = parts.scheme
                self.origin = f"{parts.scheme}://{parts.netloc}"
                path = parts.path
                # urljoin drops empty segments and resolves dot segments of the base's directory
                if not _PATH_NEEDS_URLJOIN.search(path) and "//" not in path:
                    self.directory = self.origin + (path[: path.rfind("/") + 1] or "/")

    def resolve(self, url: str) -> str:
        if self.origin and url[-1] not in "?#" and not _NEEDS_URLJOIN.search(url):
            path = _PATH_PART.match(url).group()  # type: ignore[union-attr]
            if not _PATH_NEEDS_URLJOIN.search(path):
                first = url[0]
                if first == "/":
                    if url[1:2] != "/":
                        return self.origin + url
                    if url[2:3] not in ("", "/", "?", "#") and url.isascii():  # urlsplit checks non-ASCII hosts
                        return f"{self.scheme}:{url}"
                elif self.directory and first.isalnum() and ":" not in path and "//" not in path:
                    # not a scheme, no leading control character, no empty segment to drop
                    return self.directory + url
        try:
            return urljoin(self.base_url, url)
        except ValueError:
            return ""


