"""HTML for the lineage and card views: pages, the funnel as inline SVG, shard status bars.

Pure functions from query results to markup. Every value that comes from lineage or a card
goes through :func:`esc`; the Markdown renderer has raw HTML turned off. The look comes from
``web/airflow.css`` (Airflow 3's colours, light and dark), served next to the pages, so
nothing is fetched from the network.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from typing import Iterable, Sequence

from laion_tasks.lineage import FunnelRow
from laion_tasks.serve.lineage_queries import ShardAttempts, StageStatus

OUTCOME_CLASSES = (("pass", "kept / success"), ("drop", "dropped"), ("fail", "failed"), ("bad", "bad input"), ("skip", "skipped"), ("other", "other"))
PASS_OUTCOMES = ("kept", "success")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str, crumbs: Sequence[tuple[str, str | None]] = (), static: str = "static/") -> str:
    """A whole page; ``static`` is the relative path to the app's static files from this page."""
    trail = " / ".join(f"<a href='{esc(href)}'>{esc(label)}</a>" if href else esc(label) for label, href in crumbs)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><link rel='stylesheet' href='{esc(static)}airflow.css'>"
        f"<script src='{esc(static)}theme.js'></script></head><body>"
        + (f"<div class='crumbs'>{trail}</div>" if trail else "")
        + body
        + "</body></html>"
    )


def outcome_class(outcome: str) -> str:
    if outcome in PASS_OUTCOMES:
        return "pass"
    prefix = outcome.split(":", 1)[0]
    return prefix if prefix in ("drop", "fail", "bad", "skip") else "other"


def legend(classes: Iterable[tuple[str, str]]) -> str:
    return "<div class='legend'>" + "".join(f"<span><i class='c-{esc(c)}'></i>{esc(label)}</span>" for c, label in classes) + "</div>"


# -- funnel ------------------------------------------------------------------------


def funnel_stages(rows: Sequence[FunnelRow]) -> list[tuple[str, dict[str, int]]]:
    """(stage, {outcome: samples}) in the order lineage gives (pipeline order)."""
    stages: dict[str, dict[str, int]] = {}
    for r in rows:
        stages.setdefault(r.stage, {})[r.outcome] = stages.get(r.stage, {}).get(r.outcome, 0) + r.count
    return list(stages.items())


def funnel_svg(rows: Sequence[FunnelRow], width: int = 900) -> str:
    """One bar per stage: its length is the rows the stage saw, its segments what became of them.

    Over more than three orders of magnitude (a real crawl: billions of links, thousands of
    high-resolution images) bar lengths switch to a log scale; segments stay shares of the bar.
    """
    stages = funnel_stages(rows)
    if not stages:
        return "<p class='muted'>No done shards yet.</p>"
    totals = [sum(o.values()) for _, o in stages]
    top = max(totals) or 1
    positive = [t for t in totals if t > 0]
    log_scale = bool(positive) and top / min(positive) > 1000
    label_w, value_w, bar_h, gap = 220, 190, 22, 10
    track_w = width - label_w - value_w
    height = len(stages) * (bar_h + gap) + 24

    def length(total: int) -> float:
        if total <= 0:
            return 0.0
        share = math.log10(total + 1) / math.log10(top + 1) if log_scale else total / top
        return max(2.0, track_w * share)

    parts = [
        f"<svg class='funnel' role='img' aria-label='funnel' viewBox='0 0 {width} {height}' xmlns='http://www.w3.org/2000/svg'>"
    ]
    for i, ((stage, outcomes), total) in enumerate(zip(stages, totals)):
        y = 4 + i * (bar_h + gap)
        parts.append(f"<text x='{label_w - 8}' y='{y + bar_h * 0.7:.1f}' text-anchor='end'>{esc(stage)}</text>")
        parts.append(f"<rect class='track' x='{label_w}' y='{y}' width='{track_w}' height='{bar_h}' rx='3'/>")
        bar = length(total)
        by_class: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for outcome, n in outcomes.items():
            by_class[outcome_class(outcome)].append((outcome, n))
        x = float(label_w)
        for cls, _ in OUTCOME_CLASSES:
            items = by_class.get(cls)
            n = sum(v for _, v in items or ())
            if not n:
                continue
            w = bar * n / total
            tip = f"{stage}: " + ", ".join(f"{o} {v:,}" for o, v in sorted(items or (), key=lambda kv: -kv[1]))
            parts.append(
                f"<rect class='c-{cls}' x='{x:.1f}' y='{y}' width='{w:.1f}' height='{bar_h}'><title>{esc(tip)}</title></rect>"
            )
            x += w
        passed = sum(v for o, v in outcomes.items() if o in PASS_OUTCOMES)
        share = f" ({100.0 * passed / total:.1f}% pass)" if total else ""
        parts.append(f"<text x='{label_w + track_w + 8}' y='{y + bar_h * 0.7:.1f}'>{total:,} rows{esc(share)}</text>")
    scale = "bar length: rows in, log scale" if log_scale else "bar length: rows in"
    parts.append(f"<text class='muted' x='{label_w}' y='{height - 4}'>{esc(scale)}; hover a segment for its outcomes</text>")
    parts.append("</svg>")
    present = {outcome_class(o) for _, outcomes in stages for o in outcomes}
    return legend((c, label) for c, label in OUTCOME_CLASSES if c in present) + "".join(parts)


def funnel_table(rows: Sequence[FunnelRow]) -> str:
    body = "".join(
        f"<tr><td>{esc(r.stage)}</td><td><span class='s-{esc(outcome_class(r.outcome)).replace('pass', 'kept')}'>{esc(r.outcome)}</span></td>"
        f"<td class=n>{r.count:,}</td><td class=n>{r.shards:,}</td></tr>"
        for r in rows
    )
    return (
        "<details><summary class='muted'>Funnel as a table</summary><table><tr><th>stage</th><th>outcome</th>"
        f"<th class=n>samples</th><th class=n>shards</th></tr>{body}</table></details>"
    )


# -- shard status -----------------------------------------------------------------------


def status_bar(s: StageStatus, width: int = 220, height: int = 14) -> str:
    """Done / failed / running shards of one stage as one stacked bar."""
    if not s.shards:
        return ""
    parts = [f"<svg width='{width}' height='{height}' role='img' aria-label='{esc(s.stage)} shards'>", f"<rect class='track' width='{width}' height='{height}' rx='3'/>"]
    x = 0.0
    for cls, n, label in (("pass", s.done, "done"), ("fail", s.failed, "failed"), ("run", s.running, "running")):
        if n:
            w = width * n / s.shards
            parts.append(f"<rect class='c-{cls}' x='{x:.1f}' width='{w:.1f}' height='{height}'><title>{n:,} {label}</title></rect>")
            x += w
    return "".join(parts) + "</svg>"


def stage_table(stages: Sequence[StageStatus]) -> str:
    if not stages:
        return "<p class='muted'>No shard has run yet.</p>"
    rows = "".join(
        f"<tr><td>{esc(s.stage)}</td><td>{status_bar(s)}</td><td class=n>{s.shards:,}</td>"
        f"<td class=n><span class='s-done'>{s.done:,}</span></td>"
        f"<td class=n>{_nonzero(s.failed, 's-failed')}</td><td class=n>{_nonzero(s.running, 's-running')}</td>"
        f"<td class=n>{s.attempts:,}</td><td class=n>{_nonzero(s.failed_attempts, 's-failed')}</td>"
        f"<td class=n>{s.retried_done:,}</td><td class=n>{_duration(s.duration_s)}</td></tr>"
        for s in stages
    )
    return (
        legend((("pass", "done"), ("fail", "failed"), ("run", "running")))
        + "<table><tr><th>stage</th><th>shards</th><th class=n>total</th><th class=n>done</th><th class=n>failed</th>"
        "<th class=n>running</th><th class=n>attempts</th><th class=n>failed attempts</th><th class=n>done after retry</th>"
        f"<th class=n>shard time</th></tr>{rows}</table>"
    )


def failures_table(shards: Sequence[ShardAttempts]) -> str:
    if not shards:
        return "<p class='muted'>No failed attempts.</p>"
    rows = "".join(
        f"<tr><td>{esc(s.stage)}</td><td><code>{esc(s.shard_id)}</code></td>"
        f"<td><span class='badge s-{esc(s.status)}'>{esc('failing' if s.status == 'failed' else s.status)}</span></td>"
        f"<td class=n>{s.failed_attempts:,} of {s.attempts:,}</td>"
        f"<td><details{' open' if s.status == 'failed' and i < 5 else ''}><summary>{esc(_first_line(s.error))}</summary>"
        f"<pre>{esc(s.error[:4000])}</pre><div class='muted'>input <code>{esc(s.input_uri)}</code>"
        f"{' at ' + esc(s.finished_at.strftime('%Y-%m-%d %H:%M:%S')) if s.finished_at else ''}</div></details></td></tr>"
        for i, s in enumerate(shards)
    )
    return (
        "<table><tr><th>stage</th><th>shard</th><th>now</th><th class=n>failed attempts</th><th>latest error</th></tr>"
        f"{rows}</table>"
    )


def _first_line(text: str, limit: int = 140) -> str:
    line = (text or "(no error text)").strip().splitlines()[0] if (text or "").strip() else "(no error text)"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _nonzero(n: int, cls: str) -> str:
    return f"<span class='{cls}'>{n:,}</span>" if n else "0"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# -- Markdown ------------------------------------------------------------------------


def render_markdown(text: str) -> str:
    """CommonMark + tables with raw HTML off: a card's text is shown, never executed."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    return md.render(text)
