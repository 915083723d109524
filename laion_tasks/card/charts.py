"""The card's charts: PNG figures (matplotlib, Agg) of the funnel, similarities, sizes, languages and samples."""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict
from typing import Any

from laion_tasks import storage

log = logging.getLogger(__name__)




def _figure(width: float, height: float):  # type: ignore[no-untyped-def]
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig: Any, uri: str) -> None:
    with storage.atomic_local_path(uri, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})


def _funnel_chart(steps: list[tuple[str, int]], uri: str, title: str) -> None:
    fig = _figure(8, 0.45 * len(steps) + 1.2)
    ax = fig.subplots()
    labels = [s for s, _ in steps][::-1]
    values = [n for _, n in steps][::-1]
    ax.barh(range(len(values)), values, color="#4477aa")
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,}", va="center", fontsize=8)
    ax.set_xlabel("samples")
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 1000:
        ax.set_xscale("log")  # a real crawl spans billions of links down to thousands of high-res images
        ax.set_xlabel("samples (log scale)")
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.15)
    _save(fig, uri)


def _similarity_chart(hist: list[tuple[float, bool, int]], uri: str, title: str) -> None:
    fig = _figure(7, 3.5)
    ax = fig.subplots()
    kept = defaultdict(int)
    dropped = defaultdict(int)
    for b, k, n in hist:
        (kept if k else dropped)[b] += n
    xs = sorted(set(kept) | set(dropped))
    ax.bar(xs, [dropped[x] for x in xs], width=0.01, align="edge", color="#cc6677", label="filtered by CLIP")
    ax.bar(xs, [kept[x] for x in xs], width=0.01, align="edge", bottom=[dropped[x] for x in xs], color="#117733", label="kept by CLIP")
    ax.set_xlabel("CLIP image-text cosine similarity")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, uri)


def _size_chart(widths: list[tuple[int, int]], heights: list[tuple[int, int]], uri: str) -> None:
    fig = _figure(8, 3.2)
    axes = fig.subplots(1, 2)
    for ax, hist, name in ((axes[0], widths, "original width"), (axes[1], heights, "original height")):
        ax.bar([b for b, _ in hist], [n for _, n in hist], color="#4477aa")
        ax.set_xticks([b for b, _ in hist], [f"{2**b}" for b, _ in hist], fontsize=7, rotation=45)
        ax.set_xlabel(f"{name} (px, power-of-two buckets)")
        ax.set_ylabel("downloaded images")
    _save(fig, uri)


def _shares_chart(langs: list[tuple[str, int]], groups: list[tuple[str, int]], uri: str) -> None:
    fig = _figure(8, 3.5)
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    axes[0].bar(range(len(langs)), [n for _, n in langs], color="#4477aa")
    axes[0].set_xticks(range(len(langs)), [v for v, _ in langs], fontsize=7, rotation=45)
    axes[0].set_title("language (CLIP-scored samples)", fontsize=9)
    axes[1].bar(range(len(groups)), [n for _, n in groups], color="#ddaa33")
    axes[1].set_xticks(range(len(groups)), [v for v, _ in groups], fontsize=7)
    axes[1].set_title("language group", fontsize=9)
    _save(fig, uri)


def _grid_chart(samples: list[dict[str, Any]], thumbs: dict[str, Any], uri: str, title: str) -> int:
    shown = [s for s in samples if s["key"] in thumbs]
    cols = 4
    rows = max(1, math.ceil(len(shown) / cols))
    fig = _figure(cols * 2.0, rows * 2.3 + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, shown):
        ax.imshow(thumbs[s["key"]])
        sim = "-" if s["similarity"] is None else f"{s['similarity']:.2f}"
        caption = (s["caption"] or "").replace("\n", " ")
        label = f"sim {sim} {s['outcome'].replace('drop:', '')}\n{caption[:30]}"
        ax.set_title(label, fontsize=6, parse_math=False)
    if not shown:
        axes[0][0].text(0.5, 0.5, "no samples to show", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle(title, fontsize=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs missing from the default font (CJK captions)
        _save(fig, uri)
    return len(shown)
