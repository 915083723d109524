"""AI-use preferences a publisher attaches to content: read, combined, and recorded per sample.

Sources, and the text each follows (read September 2026; all are drafts or industry conventions, none
is an RFC yet):

* **IETF AIPREF vocabulary**, draft-ietf-aipref-vocab-07 (19 August 2026; -08 of 14 September 2026 is
  not yet reflected here). §6.1: the labels ``train-ai`` (AI Model Training, §4.1) and ``search``
  (§4.2); §6.2: the values are the Tokens ``y`` / ``n``; §6.4: unknown labels and parameters are
  ignored; §6.5: the statement is an RFC 9651 Dictionary (case sensitive; the last of duplicated keys
  applies; a value that is not the Token ``y`` or ``n`` is "unknown"; a Dictionary that does not parse
  leaves every preference unknown); §5.1 "Combining Preferences": any disallow wins, else any allow,
  else unknown (the most restrictive applies).
* **IETF AIPREF attachment**, draft-ietf-aipref-attach-05 (19 August 2026). §2: the ``Content-Usage``
  HTTP response field (an RFC 9651 Dictionary about the content of that message). §3: the robots.txt
  rule ``Content-Usage: [path] statement`` inside a group (§3.2: the value ends at CR, LF or ``#``; a
  path starts with ``/`` and ends before the first SP or HTAB); §3.1: the rule with the longest
  matching path applies, matched as Allow/Disallow are (RFC 9309 §2.2.2; length in bytes of the encoded
  path, an absent path being empty); rules with identical paths combine by the vocabulary's §5.1 (which
  attach-05 still cites as "Section 7.1 of VOCAB", an older numbering); only crawlable paths have
  preferences. Example §3.4: ``Content-Usage: train-ai=n`` plus
  ``Content-Usage: /ai-ok/ train-ai=y`` gives /test ``train-ai=n`` and /ai-ok/test ``train-ai=y``.
* **Cloudflare Content Signals** (contentsignals.org policy text; draft-romm-aipref-contentsignals-00,
  §3-4): ``Content-Signal: search=yes, ai-input=yes, ai-train=no`` in a robots.txt group; ``yes``
  grants, ``no`` restricts, an absent signal does neither. Cloudflare also sends it as a response
  header (its Markdown responses do), read here the same way.
* **RSL 1.0** (rslstandard.org, 10 December 2025, "Adding RSL to robots.txt"): ``License: <absolute
  URL>`` lines, global (not tied to a user agent), pointing to an RSL license document. We record the
  URLs; the license XML itself is not fetched or evaluated.

Two readings (``download.usage_pref_reading``):

* ``drafts``: exactly the texts above.
* ``strict`` (the default): the above, plus every refusal a publisher may have meant (permissions are
  only ever taken as the drafts read them): labels and values in any case, ``no`` for ``n``, quoted
  values, a Dictionary that does not parse read member by member, a refusal in a duplicated key kept
  (the drafts: the last one wins), each vocabulary's labels in the other's field, labels of earlier
  AIPREF vocabulary drafts (``ai-use``, -02 §4.4 -> ``ai-input``; ``train-genai``, -02/-03 ->
  ``train-ai``, since such datasets train generative models too; ``all`` (-02) / ``bots`` (-03, -04),
  the parent "Automated Processing" category, for every use the statement leaves unset), and robots.txt
  rules written before any ``User-agent`` line, taken as meant for every agent.

Our categories of use: ``train-ai``, ``ai-input`` (Content Signals' RAG / grounding input, AIPREF
-02's "AI Use") and ``search``. protego (0.7) drops the directives it does not know (it only counts
them), so the lines are read here, grouped as protego groups them; the group is protego's choice for our
product token (else ``*``), and paths are matched by protego's Allow/Disallow matcher, so preferences
and the crawl decision agree by construction.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterable, Literal

Use = Literal["train-ai", "ai-input", "search"]
Reading = Literal["strict", "drafts"]
USES: tuple[str, ...] = ("train-ai", "ai-input", "search")
ROW_FIELDS: dict[str, str] = {"train-ai": "train_ai", "ai-input": "ai_input", "search": "search"}
"""Use -> the field of the per-sample ``usage_pref`` struct that holds its value (``y`` / ``n`` / NULL)."""
OUTCOME_NAMES: dict[str, str] = {"train-ai": "ai_train", "ai-input": "ai_input", "search": "search"}
"""Use -> the name in a refusal's status (``opted_out_ai_train``) and outcome (``opted_out:ai_train``)."""
SQL_TYPE = "STRUCT(train_ai VARCHAR, ai_input VARCHAR, search VARCHAR, sources VARCHAR[], licenses VARCHAR[])"
"""The DuckDB type of the ``usage_pref`` column (see :meth:`UsagePref.to_row`)."""

CONTENT_USAGE = "Content-Usage"
CONTENT_SIGNAL = "Content-Signal"
AIPREF_LABELS: dict[str, tuple[str, ...]] = {"train-ai": ("train-ai",), "search": ("search",)}
"""draft-ietf-aipref-vocab-07 §6.1, Table 1."""
SIGNAL_LABELS: dict[str, tuple[str, ...]] = {"ai-train": ("train-ai",), "ai-input": ("ai-input",), "search": ("search",)}
"""contentsignals.org; draft-romm-aipref-contentsignals-00 §4, Table 1."""
LEGACY_LABELS: dict[str, tuple[str, ...]] = {"ai-use": ("ai-input",), "train-genai": ("train-ai",)}
"""Strict reading: labels of earlier vocabulary drafts (-02 §4.3-4.4, -03)."""
PARENT_LABELS = frozenset({"all", "bots"})
"""Strict reading: "Automated Processing" (vocab -02 ``all``, -03/-04 ``bots``), the parent of every use."""
_STRICT_VALUES = {"y": "y", "yes": "y", "n": "n", "no": "n"}
MAX_SOURCE_CHARS = 300
MAX_LICENSES = 8
MAX_LICENSE_CHARS = 2048
_AGENT_FIELDS = frozenset({"user-agent", "useragent", "user agent"})
_SITE_WIDE_FIELDS = frozenset({"sitemap", "sitemaps", "site-map", "host"})
"""Fields that, as in protego, do not end a group of user-agent lines."""


def combine_values(values: Iterable[str | None]) -> str | None:
    """draft-ietf-aipref-vocab-07 §5.1: any ``n`` gives ``n``, else any ``y`` gives ``y``, else unknown."""
    seen = set(values)
    return "n" if "n" in seen else "y" if "y" in seen else None


def _merge(into: dict[str, str], use: str, value: str) -> None:
    into[use] = combine_values((into.get(use), value)) or value


def _aipref_dictionary(text: str) -> dict[str, str] | None:
    """draft-ietf-aipref-vocab-07 §6.5 on an RFC 9651 Dictionary; None when it does not parse."""
    import http_sfv

    parsed = http_sfv.Dictionary()
    try:
        parsed.parse(text.encode("utf-8"))
    except ValueError:  # §6.5.1: "If the parsing of the Dictionary fails, preferences are unknown."
        return None
    out: dict[str, str] = {}
    for key, member in parsed.items():
        value = getattr(member, "value", None)  # an Inner List has none: unknown
        if isinstance(value, http_sfv.Token) and str(value) in ("y", "n"):
            out[key] = str(value)
    return out


def _members(text: str) -> Iterable[tuple[str, str]]:
    """(label, value) of each ``label=value`` member of a comma-separated list, parameters dropped."""
    for member in text.split(","):
        key, _, value = member.split(";", 1)[0].partition("=")
        yield key.strip().strip("\"'"), value.strip().strip("\"'")


def parse_statement(field: str, text: str, reading: Reading) -> dict[str, str]:
    """The preferences one ``Content-Usage`` or ``Content-Signal`` statement states: use -> ``y`` / ``n``."""
    return dict(_parse_statement(field.lower(), text, reading))


@functools.lru_cache(maxsize=4096)
def _parse_statement(field: str, text: str, reading: Reading) -> tuple[tuple[str, str], ...]:
    out: dict[str, str] = {}
    if field == CONTENT_USAGE.lower():
        found = _aipref_dictionary(text) or {}
        for label, value in found.items():
            for use in AIPREF_LABELS.get(label, ()):
                out[use] = value
    else:  # Content-Signal: comma-separated label=yes|no (contentsignals.org)
        for label, value in _members(text):
            mapped = {"yes": "y", "no": "n"}.get(value)
            for use in SIGNAL_LABELS.get(label, ()) if mapped else ():
                _merge(out, use, mapped)  # type: ignore[arg-type]
    if reading == "strict":
        # Only refusals are added: a permission counts only where the drafts' own reading gives it.
        parent_refuses = False
        labels = {**AIPREF_LABELS, **SIGNAL_LABELS, **LEGACY_LABELS}
        for label, raw in _members(text):
            if _STRICT_VALUES.get(raw.lower()) != "n":
                continue
            label = label.lower()
            parent_refuses |= label in PARENT_LABELS
            for use in labels.get(label, ()):
                out[use] = "n"
        for use in USES if parent_refuses else ():
            out.setdefault(use, "n")  # vocab -02 §5.1: a more specific category's own preference overrides
    return tuple(sorted(out.items()))


def _clip(text: str, limit: int = MAX_SOURCE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class UsagePref:
    """What was found for one sample: values per use (``y`` / ``n``; unset: unknown), the statements they
    came from (``"robots.txt Content-Usage: /ai-ok/ train-ai=y"``, ``"header Content-Usage: train-ai=n"``),
    and RSL license URLs."""

    values: tuple[tuple[str, str], ...] = ()
    sources: tuple[str, ...] = ()
    licenses: tuple[str, ...] = ()

    def value(self, use: str) -> str | None:
        return dict(self.values).get(use)

    def refused(self, uses: Iterable[str]) -> list[str]:
        """The uses among ``uses`` this preference disallows, in the order given."""
        return [use for use in uses if self.value(use) == "n"]

    def combine(self, other: "UsagePref | None") -> "UsagePref":
        """Both statements, combined per draft-ietf-aipref-vocab-07 §5.1 (the most restrictive applies)."""
        if other is None:
            return self
        mine, theirs = dict(self.values), dict(other.values)
        values = {use: combine_values((mine.get(use), theirs.get(use))) for use in set(mine) | set(theirs)}
        return UsagePref(
            tuple(sorted((u, v) for u, v in values.items() if v is not None)),
            tuple(dict.fromkeys(self.sources + other.sources)),
            tuple(dict.fromkeys(self.licenses + other.licenses)),
        )

    def to_row(self) -> dict[str, Any]:
        """The ``usage_pref`` struct of the download Parquet (:data:`SQL_TYPE`)."""
        values = dict(self.values)
        return {**{ROW_FIELDS[u]: values.get(u) for u in USES}, "sources": list(self.sources), "licenses": list(self.licenses)}

    @classmethod
    def from_row(cls, row: dict[str, Any] | None) -> "UsagePref | None":
        if not row:
            return None
        values = tuple(sorted((u, row[f]) for u, f in ROW_FIELDS.items() if row.get(f) in ("y", "n")))
        return cls(values, tuple(row.get("sources") or ()), tuple(row.get("licenses") or ()))


def combine(prefs: Iterable[UsagePref | None]) -> UsagePref | None:
    out: UsagePref | None = None
    for pref in prefs:
        if pref is not None:
            out = pref if out is None else out.combine(pref)
    return out


def statement_pref(field: str, text: str, reading: Reading, origin: str) -> UsagePref:
    """One statement as a :class:`UsagePref`, its source written ``"<origin> <field>: <text>"``."""
    return UsagePref(tuple(sorted(parse_statement(field, text, reading).items())), (_clip(f"{origin} {field}: {text}"),))


def header_pref(content_usage: list[str], content_signal: list[str], reading: Reading) -> UsagePref | None:
    """The preferences of an image response's ``Content-Usage`` (draft-ietf-aipref-attach-05 §2) and
    ``Content-Signal`` header fields. Several ``Content-Usage`` lines are one Dictionary (RFC 9110 §5.3),
    so they are joined before parsing."""
    prefs = []
    if content_usage:
        prefs.append(statement_pref(CONTENT_USAGE, ", ".join(v.strip() for v in content_usage), reading, "header"))
    for value in content_signal:
        prefs.append(statement_pref(CONTENT_SIGNAL, value.strip(), reading, "header"))
    return combine(prefs)


# -- robots.txt ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RobotsUsageRule:
    """One ``Content-Usage`` / ``Content-Signal`` line of a robots.txt."""

    field: str
    """:data:`CONTENT_USAGE` or :data:`CONTENT_SIGNAL`."""
    path: str
    """"" when absent (the rule covers every path, with a match length of 0)."""
    statement: str
    agents: frozenset[str] | None
    """The lower-cased user agents of its group; None for a line before any ``User-agent`` line."""

    @functools.cached_property
    def _pattern(self) -> Any:
        from protego._urlpattern import _URLPattern  # the Allow/Disallow matcher (RFC 9309 §2.2.2)
        from protego._utils import _quote_pattern

        quoted = _quote_pattern(self.path)
        return _URLPattern(quoted) if quoted else None

    def match_length(self, quoted_path: str) -> int | None:
        """The rule's priority for a path normalised by protego (``_quote_path``): the byte length of its
        encoded path when it matches, 0 for a rule without a path, None when it does not match."""
        if not self.path:
            return 0
        pattern = self._pattern
        if pattern is None or not pattern.match(quoted_path):
            return None
        return int(pattern.priority)  # len() of the percent-encoded pattern: its length in bytes

    def source(self) -> str:
        return _clip(f"robots.txt {self.field}: {self.path + ' ' if self.path else ''}{self.statement}")


def _split_rule_value(value: str) -> tuple[str, str]:
    """draft-ietf-aipref-attach-05 §3.2: a path starts with "/" and ends before the first SP or HTAB."""
    if not value.startswith("/"):
        return "", value
    for i, char in enumerate(value):
        if char in " \t":
            return value[:i], value[i:].strip(" \t")
    return value, ""


@dataclass(frozen=True)
class RobotsUsage:
    """The usage-preference lines of one robots.txt; reading-independent, so it is parsed once per origin."""

    rules: tuple[RobotsUsageRule, ...] = ()
    licenses: tuple[str, ...] = ()

    def pref_for(self, url: str, agent: str | None, reading: Reading) -> UsagePref | None:
        """The preferences for ``url``: per field, the rules of ``agent``'s group(s) with the longest matching
        path, combined (§3.1: identical paths combine by vocab-07 §5.1); then both fields combined; plus the RSL
        license URLs. ``agent`` is the group protego chose for our token (its user-agent value), or None."""
        from protego._utils import _quote_path

        quoted = _quote_path(url)
        best: dict[str, tuple[int, list[RobotsUsageRule]]] = {}
        for rule in self.rules:
            if rule.agents is None:
                if reading != "strict":
                    continue  # RFC 9309 §2.1: a rule belongs to a group
            elif agent is None or agent not in rule.agents:
                continue
            length = rule.match_length(quoted)
            if length is None:
                continue
            top = best.get(rule.field)
            if top is None or length > top[0]:
                best[rule.field] = (length, [rule])
            elif length == top[0]:
                top[1].append(rule)
        prefs = [
            UsagePref(tuple(sorted(parse_statement(r.field, r.statement, reading).items())), (r.source(),))
            for _, rules in best.values() for r in rules
        ]  # fmt: skip
        if self.licenses:
            prefs.append(UsagePref(licenses=self.licenses))
        return combine(prefs)


def parse_robots_usage(text: str) -> RobotsUsage:
    """The ``Content-Usage`` / ``Content-Signal`` rules (with their groups) and RSL ``License`` URLs of a
    robots.txt. Groups are delimited as protego delimits them (a ``User-agent`` line after any other rule
    but ``Sitemap`` / ``Host`` starts a new group), so :meth:`RobotsUsage.pref_for` can take protego's
    choice of group."""
    rules: list[RobotsUsageRule] = []
    licenses: list[str] = []
    agents: set[str] = set()
    seen_agent = previous_was_agent = False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()  # attach-05 §3.2: the value ends at CR, LF or "#"
        field, sep, value = line.partition(":")
        if not sep:
            continue
        field, value = field.strip().lower(), value.strip()
        if field in _AGENT_FIELDS:
            if not previous_was_agent:
                agents = set()
            agents.add(value.lower())
            if value != "*" and "*" in value:  # as protego: "*" inside an agent name is dropped
                agents.add(value.replace("*", "").lower())
            seen_agent = previous_was_agent = True
            continue
        if field in _SITE_WIDE_FIELDS:
            continue
        previous_was_agent = False
        if field == "license" and value and len(licenses) < MAX_LICENSES:  # RSL 1.0: global, any position
            licenses.append(value[:MAX_LICENSE_CHARS])
        elif field in ("content-usage", "content-signal") and value:
            path, statement = _split_rule_value(value)
            name = CONTENT_USAGE if field == "content-usage" else CONTENT_SIGNAL
            rules.append(RobotsUsageRule(name, path, statement, frozenset(agents) if seen_agent else None))
    return RobotsUsage(tuple(rules), tuple(dict.fromkeys(licenses)))
