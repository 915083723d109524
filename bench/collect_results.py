"""Generate bench/RESULTS.md and docs/SCALE.md from the recorded runs in bench/results/*.json.

    .venv/bin/python bench/collect_results.py           # write both files
    .venv/bin/python bench/collect_results.py --check   # exit 1 if either differs from what the JSON gives

The JSON files are the record (format: bench/README.md); the two Markdown files are derived from them
and never edited by hand, so a figure in either always has a recorded run behind it. Every target
verdict is computed here from the figure and the target (:func:`verdict`): a headline says "met" only
where the recorded figure meets the target.

Bench scripts call :func:`machine_info` and :func:`save_run` to record a run, which also regenerates
both files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
SCALE_MD = REPO / "docs" / "SCALE.md"
README_MD = REPO / "README.md"
SCALE_TEMPLATE = HERE / "scale_template.md"
# Known benches in the order RESULTS.md shows them; any other bench/results/<name>.json follows, rendered generically.
ORDER = ["extract", "download", "clip", "langid", "tag", "dedup", "curate", "index", "eval"]


# ---------------------------------------------------------------- recording (used by the bench scripts)


def machine_info(load_before: float | None = None, load_after: float | None = None, shared: bool = True) -> dict:
    """What a figure was measured on: CPUs, model, memory, GPU (nvidia-smi), load average."""
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        names = [n.strip() for n in proc.stdout.splitlines() if n.strip()] if proc.returncode == 0 else []
        gpu = f"{len(names)} x {names[0]}" if names else None
    load_after = os.getloadavg()[0] if load_after is None else load_after
    load = f"{load_before:.1f} before, {load_after:.1f} after" if load_before is not None else f"{load_after:.1f} at the end"
    return {
        "cpus": os.cpu_count(),
        "arch": platform.machine(),
        "cpu_model": cpu_model,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "gpu": gpu,
        "shared": shared,
        "load": load,
    }


def save_run(bench: str, run: dict, title: str | None = None, regenerate: bool = True,
             results_dir: Path = RESULTS_DIR) -> Path:
    """Record one run in ``<results_dir>/<bench>.json``.

    The run replaces the recorded run with the same ``label`` (default "latest") and keeps the others, so a
    deliberately labelled earlier run stays in the record. Then RESULTS.md and SCALE.md are regenerated.
    """
    for key in ("date", "machine"):
        if key not in run:
            raise ValueError(f"run for {bench}.json has no {key!r}: every figure set states when and on what")
    run = {"label": "latest", **run}
    path = results_dir / f"{bench}.json"
    record = json.loads(path.read_text()) if path.exists() else {"bench": bench, "runs": []}
    if title:
        record["title"] = title
    record.setdefault("title", bench)
    record["runs"] = [r for r in record.get("runs", []) if r.get("label") != run["label"]] + [run]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    if regenerate and results_dir.resolve() == RESULTS_DIR:
        write_all()
    return path


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


# ---------------------------------------------------------------- targets and verdicts


OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
}


@dataclass(frozen=True)
class Target:
    """A requirement on one figure: ``value <op> threshold``; ``text`` is how the headline states it."""

    op: str
    threshold: Any
    text: str

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown target operator {self.op!r} (one of {sorted(OPS)})")

    def meets(self, value: Any) -> bool:
        return bool(OPS[self.op](value, self.threshold))


def verdict(value: Any, target: Target | None) -> str:
    """"met" only when the recorded figure meets the target; "not met" otherwise; "not measured" without one."""
    if target is None:
        return ""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    return "met" if target.meets(value) else "**not met**"


@dataclass
class Row:
    """One headline figure. ``value`` is what ``target`` is checked against (None: not measured)."""

    stage: str
    figure: str
    ours: str = ""
    peer: str = ""
    ratio: str = ""
    target: Target | None = None
    value: Any = None
    comment: str = ""
    measured: str = ""
    shown: str = ""  # the figure as the closing list quotes it (default: ours)

    def verdict(self) -> str:
        return verdict(self.value, self.target)


def check_row(stage: str, check: dict, measured: str) -> Row:
    """A headline row from a ``checks`` entry of a JSON record (see bench/README.md)."""
    try:
        t = check["target"]
        target = Target(t["op"], t["value"], t.get("text") or f"{t['op']} {t['value']}")
        figure = check["figure"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{stage}: check {check!r} needs 'figure' and 'target': {{'op', 'value'}}") from exc
    value = check.get("value")
    shown = check.get("ours") or ("not measured" if value is None else fmt_value(value))
    return Row(stage, figure, shown, check.get("peer", ""), check.get("ratio", ""), target, value,
               check.get("comment", ""), measured)


# ---------------------------------------------------------------- formatting


def fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def n0(v: float) -> str:
    return f"{v:,.0f}"


def pct(v: float, digits: int = 1) -> str:
    return f"{100 * v:.{digits}f}%"


def gib(kb: float) -> str:
    return f"{kb / 2**20:.2f}"


def rows_label(n: int) -> str:
    """250000 -> 250k, 4000000 -> 4M."""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return f"{n:,}"


def table(header: list[str], rows: Iterable[list[Any]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] * len(header)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(fmt_value(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out


def memory_bytes(text: str) -> float:
    """'4GB' -> 4e9, '2GiB' -> 2 * 2**30 (DuckDB's reading of memory_limit)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B\s*", text, re.I)
    if not m:
        raise ValueError(f"cannot read memory size {text!r}")
    base = 1024 if m.group(3) else 1000
    return float(m.group(1)) * base ** "BKMGT".index((m.group(2) or "B").upper())


def describe_machine(m: dict) -> str:
    """'2-core x86_64 (AMD EPYC), 24 GiB, CPU only, shared with other jobs (load average 6.2 before, 7.1 after)'."""
    if not m:
        return "machine not recorded"
    parts = [f"{m.get('cpus', '?')}-core {m.get('arch', '')}".strip()
             + (f" ({m['cpu_model']})" if m.get("cpu_model") else "")]
    if m.get("mem_gib"):
        parts.append(f"{m['mem_gib']} GiB")
    parts.append(f"GPU: {m['gpu']}" if m.get("gpu") else "CPU only, no GPU")
    text = ", ".join(parts)
    if m.get("shared"):
        text += ", shared with other jobs"
    if m.get("load"):
        load = str(m["load"])
        text += f" (load average {load})" if re.match(r"[\d.]", load) else f" ({load})"
    if m.get("note"):
        text += f"; {m['note']}"
    return text


def short_machine(m: dict) -> str:
    gpu = m.get("gpu") or "CPU"
    return f"{m.get('cpus', '?')}-core {m.get('arch', '')}, {gpu}" + (", shared" if m.get("shared") else "")


def measured(run: dict) -> str:
    return f"{str(run.get('date', '?'))[:10]}; {short_machine(run.get('machine') or {})}"


def run_header(run: dict) -> list[str]:
    """Date, machine, command and source of a figure set: stated with every one."""
    lines = [f"Measured {run.get('date', '(date not recorded)')} on a {describe_machine(run.get('machine') or {})}."]
    if run.get("command"):
        lines[0] += f" Command: `{run['command']}`."
    if run.get("source"):
        lines[0] += f" Source: {run['source']}."
    lines.append("")
    if run.get("setup"):
        lines += [run["setup"].strip(), ""]
    return lines


def unknown_figures(obj: dict, known: set[str], prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar figures under keys this generator does not know (flattened), so added measurements still show."""
    out: list[tuple[str, Any]] = []
    for key, value in obj.items():
        if not prefix and key in known:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += unknown_figures(value, set(), name + ".")
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out.append((name, value))
        elif isinstance(value, list) and all(isinstance(v, (int, float, str, bool)) for v in value):
            out.append((name, ", ".join(fmt_value(v) for v in value)))
    return out


def generic_parts(owner: dict, stage: str, when: str) -> tuple[list[Row], list[str]]:
    """The parts any record or run may carry: ``tables``, ``checks``, ``notes`` (bench/README.md)."""
    rows = [check_row(stage, c, when) for c in owner.get("checks", [])]
    lines: list[str] = []
    for t in owner.get("tables", []):
        if t.get("title"):
            lines += [f"**{t['title']}**", ""]
        lines += table(t["columns"], t.get("rows", [])) + [""]
        if t.get("note"):
            lines += [t["note"], ""]
    for note in owner.get("notes", []):
        lines += [note, ""]
    return rows, lines


# ---------------------------------------------------------------- per-bench sections


@dataclass
class Section:
    rows: list[Row] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


RunRenderer = Callable[[dict, dict], Section]


def render_extract(record: dict, run: dict) -> Section:
    s = Section()
    when = measured(run)
    inp, o, p, ratio = run["input"], run["ours"], run["peer"], run["ratio"]
    peer_name = p.get("name", "cc2dataset")
    s.lines += [
        f"Input: {inp['copies']} concatenated copies of `{inp['file']}`, {inp['size_mb']:.1f} MB gzip, "
        f"{inp['records']:,} metadata records, {inp['img_links']:,} `IMG@/src` links; "
        f"{run.get('settings', {}).get('rounds', '?')} rounds each.",
        "",
        *table(["", "best wall s", "median wall s", "best CPU s", "records/s (best wall)", "IMG links/s (best wall)"], [
            ["laion-tasks `extract_wat` (incl. Parquet write)", f"{o['best_wall_s']:.2f}", f"{o['median_wall_s']:.2f}",
             f"{o['best_cpu_s']:.2f}", n0(o["records_per_s"]), n0(o["img_links_per_s"])],
            [f"{peer_name} `extract_documents_from_wat`", f"{p['best_wall_s']:.2f}", f"{p['median_wall_s']:.2f}",
             f"{p['best_cpu_s']:.2f}", n0(p["records_per_s"]), n0(p["img_links_per_s"])],
            *[[f["what"], f"{f['wall_s']:.2f}", "", f"{f['cpu_s']:.2f}", n0(f["records_per_s"]), ""]
              for f in run.get("floors", [])],
        ]),
        "",
    ]
    target = Target(">=", 2.0, ">= 2x")
    worst = min(ratio["best_wall"], ratio["cpu"])
    s.lines.append(
        f"**Ratio (ours / {peer_name}): {ratio['best_wall']:.2f}x on best wall time, {ratio['median_wall']:.2f}x on "
        f"median wall time, {ratio['cpu']:.2f}x on CPU time.** Target {target.text}: {verdict(worst, target)}.")
    cpu = run.get("cpu_breakdown_s")
    if cpu:
        s.lines[-1] += (
            f" Where the time goes (CPU): read + gunzip {cpu['read_gunzip']:.2f} s; the typed decode of the records "
            f"that can hold an image link {cpu['typed_decode']:.2f} s (orjson on the same records: "
            f"{cpu['orjson_decode']:.2f} s); everything else (locating IMG links, whitespace normalisation, URL "
            f"resolution, filters, dedup, uid, Parquet) {cpu['rest']:.2f} s.")
    s.lines.append("")
    s.rows.append(Row("extract", f"WAT records/s, one core, {inp['size_mb']:.0f} MB", n0(o["records_per_s"]),
                      f"{n0(p['records_per_s'])} ({peer_name})",
                      f"{ratio['best_wall']:.2f}x (CPU {ratio['cpu']:.2f}x)", target, worst,
                      "verdict on the lower of the two ratios", when,
                      shown=f"{ratio['best_wall']:.2f}x wall, {ratio['cpu']:.2f}x CPU"))
    par = run.get("parity")
    if par:
        explained = par["peer_only_page_url"]
        s.lines += [
            f"Parity on the original file ({par['records']} records), both after whitespace normalisation, alt >= 5 "
            "characters, http(s) only, dedup of (url, alt):",
            "",
            f"- {peer_name}: {par['peer_pairs']} pairs; ours: {par['ours_pairs']} pairs; common: {par['common']}.",
            f"- Only in {peer_name}: {par['peer_only']}, of which {explained} have url == the page URL: `<img src=\"\">` "
            "(lazy-loaded images), which `urljoin(page, \"\")` turns into the page itself; we drop them as "
            "`drop:no_url`." + (f" Unexplained: {par['peer_only_other']}." if par["peer_only_other"] else ""),
            f"- Only in ours: {len(par['ours_only'])}" + (f": {par['ours_only'][:5]}" if par["ours_only"] else "."),
            f"- Our outcome counts on that file: {json.dumps(par['counts'], sort_keys=True)}.",
            "",
        ]
        same = not par["ours_only"] and not par["peer_only_other"]
        s.rows.append(Row("extract", "parity on the 2016 WAT head", f"{par['ours_pairs']} pairs",
                          f"{par['peer_pairs']} pairs", f"{par['common']} common",
                          Target("==", True, "ours a subset of the peer's, the rest explained"), same,
                          f"{explained} `src=\"\"` links explained", when, shown=f"{par['common']} of {par['ours_pairs']} in common"))
    return s


def _best(rounds: list[dict], side: str, key: str, best: Callable[[Iterable[float]], float]) -> float:
    return best(r[side][key] for r in rounds)


def render_download(record: dict, run: dict) -> Section:
    s = Section()
    when = measured(run)
    cores = run.get("settings", {}).get("cores", (run.get("machine") or {}).get("cpus", 2))
    for name, res in run.get("inputs", {}).items():
        rounds = res["rounds"]
        s.lines += [f"### Input `{name}`: {res['n']:,} URLs of {res.get('description', name)}", ""]
        header = ["round", "img2dataset ok", "img/s", "CPU ms/img", "steady CPU ms/img", "CPU share", "laion-tasks ok",
                  "img/s", "CPU ms/img", "steady CPU ms/img", "CPU share", "img/s ratio", "CPU/img ratio"]
        loads = all("load_1min_at_start" in r for r in rounds)
        header += ["load avg at start"] if loads else []
        body = []
        for i, r in enumerate(rounds):
            p, o = r["peer"], r["ours"]
            body.append([str(i), str(p["success"]), n0(p["img_s"]), f"{p['cpu_ms_per_img']:.2f}",
                         f"{p['steady_cpu_ms_per_img']:.2f}", pct(p["cpu_share"], 0), str(o["success"]), n0(o["img_s"]),
                         f"{o['cpu_ms_per_img']:.2f}", f"{o['steady_cpu_ms_per_img']:.2f}", pct(o["cpu_share"], 0),
                         f"{r['img_s_ratio']:.2f}x", f"{r['cpu_ratio']:.2f}x"]
                        + ([f"{r['load_1min_at_start']:.1f}"] if loads else []))
        s.lines += table(header, body, ["---"] + ["---:"] * (len(header) - 1)) + [""]
        best_p, best_o = _best(rounds, "peer", "img_s", max), _best(rounds, "ours", "img_s", max)
        cpu_p, cpu_o = _best(rounds, "peer", "cpu_ms_per_img", min), _best(rounds, "ours", "cpu_ms_per_img", min)
        steady_o = _best(rounds, "ours", "steady_cpu_ms_per_img", min)
        equal = all(r["peer"]["success"] == r["ours"]["success"] for r in rounds)
        img_target = Target(">=", 1.5, ">= 1.5x (stretch 2x)")
        s.lines += [
            f"- **img/s, best round of each: img2dataset {n0(best_p)}, laion-tasks {n0(best_o)}: "
            f"{best_o / best_p:.2f}x**; target {img_target.text}: {verdict(best_o / best_p, img_target)}. "
            f"Success counts {'equal in every round' if equal else '**not equal** in every round'}.",
            f"- **CPU per image, best round of each: img2dataset {cpu_p:.2f} ms, laion-tasks {cpu_o:.2f} ms: "
            f"{cpu_p / cpu_o:.2f}x** less CPU per image for ours (start-up included; not a target).",
        ]
        startup = res.get("startup_cpu_s")
        if startup:
            s.lines.append(f"- Start-up CPU (the same command on one URL): img2dataset {startup['peer']:.2f} s, "
                           f"laion-tasks {startup['ours']:.2f} s; steady CPU/img = (CPU - start-up CPU) / successes.")
        s.rows.append(Row("download", f"img/s, {cores} cores, {res['n']:,} loopback URLs, input `{name}`", n0(best_o),
                          f"{n0(best_p)} (img2dataset)", f"{best_o / best_p:.2f}x best of each", img_target,
                          best_o / best_p, f"rounds ours {' / '.join(n0(r['ours']['img_s']) for r in rounds)}, "
                          f"img2dataset {' / '.join(n0(r['peer']['img_s']) for r in rounds)}", when,
                          shown=f"{best_o / best_p:.2f}x"))
        s.rows.append(Row("download", f"equal successes, input `{name}`",
                          " / ".join(n0(r["ours"]["success"]) for r in rounds),
                          " / ".join(n0(r["peer"]["success"]) for r in rounds), "", Target("==", True, "equal"),
                          equal, "", when, shown="equal" if equal else "not equal"))
        s.rows.append(Row("download", f"CPU ms per image, input `{name}`", f"{cpu_o:.2f}", f"{cpu_p:.2f} (img2dataset)",
                          f"{cpu_p / cpu_o:.2f}x best of each", None, None, "start-up included", when))
        bound = res.get("bound")
        if bound:
            bound_name, b = max(bound.items(), key=lambda kv: kv[1]["img_s"])
            cheap_name, c = min(bound.items(), key=lambda kv: kv[1]["cpu_ms_per_img"])
            t80 = Target(">=", 0.8, ">= 80% of the CPU bound")
            share = res.get("bound_share") or {}  # as recorded (from unrounded figures) where the run kept it
            by_wall = share.get("wall", best_o / b["img_s"])
            by_cpu = share.get("cpu", c["cpu_ms_per_img"] / steady_o)
            s.lines.append(
                "- CPU bound (decode + resize + encode of the same payloads, no network, same cores): "
                + ", ".join(f"{k} {n0(v['img_s'])} img/s ({v['cpu_ms_per_img']:.2f} CPU ms/img)" for k, v in bound.items())
                + f". By wall rate ({bound_name}), our best round is {pct(by_wall, 0)} of it; by CPU per image "
                f"({cheap_name}, {c['cpu_ms_per_img']:.2f} ms against our best steady {steady_o:.2f} ms), "
                f"{pct(by_cpu, 0)}. Target {t80.text}: by wall rate {verdict(by_wall, t80)}, by CPU per image "
                f"{verdict(by_cpu, t80)}.")
            s.rows.append(Row("download", f"share of the CPU bound by wall rate, input `{name}`", pct(by_wall, 0),
                              f"{bound_name} {n0(b['img_s'])} img/s", "", t80, by_wall,
                              "bound and rounds measured at different moments of a shared machine's load", when))
            s.rows.append(Row("download", f"share of the CPU bound by CPU per image, input `{name}`", pct(by_cpu, 0),
                              f"{cheap_name} {c['cpu_ms_per_img']:.2f} ms", "", t80, by_cpu,
                              f"our best steady {steady_o:.2f} ms", when))
        s.lines.append("")
        profile = res.get("profile_ms")
        if profile:
            s.lines += ["Where our CPU goes per image (one core, in-process; the pieces of `process_image` overlap its "
                        "total):", ""]
            prof = [[k, f"{v:.3f}"] for k, v in profile.items()]
            if res.get("profile_rest_ms") is not None:
                prof.append(["**rest: HTTP client, event loop, guards, pipe, parent (best steady CPU/img - the above)**",
                             f"**{res['profile_rest_ms']:.3f}**"])
            s.lines += table(["piece", "CPU ms/img"], prof, ["---", "---:"]) + [""]
        quality = res.get("quality")
        if quality is None:
            s.lines += ["Output quality against a reference (PSNR / SSIM): not measured in this run, so equal output "
                        "quality of the two tools is not shown here.", ""]
        else:
            _download_quality(s, name, quality, when)
        other = unknown_figures(res, {"n", "description", "rounds", "startup_cpu_s", "bound", "bound_share",
                                      "profile_ms", "profile_rest_ms", "quality"})
        if other and not run.get("tables"):
            s.lines += table(["other recorded figure", "value"], [[k, v] for k, v in other]) + [""]
    return s


DOWNLOAD_PSNR = Target(">=", -0.5, "within 0.5 dB of img2dataset, or better")


def _download_quality(s: Section, name: str, q: dict, when: str) -> None:
    """The PSNR/SSIM table of one input (bench/download_quality.py) beside its speed, and its headline rows."""
    tools, cpu = q["tools"], q.get("cpu_ms_per_img", {})
    cpu_of = {"img2dataset": cpu.get("img2dataset Resizer"), "laion-tasks": cpu.get("laion-tasks process_image")}
    label = {"img2dataset": "img2dataset 1.47.0 (its `Resizer`)", "laion-tasks": "**laion-tasks** (`process_image`)"}
    body = [[label.get(t, t), f"{v['psnr_mean_db']:.2f}", f"{v['psnr_median_db']:.2f}", f"{v['psnr_p5_db']:.2f}",
             f"{v['psnr_min_db']:.2f}", f"{v['ssim_mean']:.4f}", f"{v['ssim_min']:.4f}",
             "" if cpu_of.get(t, cpu.get(t)) is None else f"{cpu_of.get(t, cpu.get(t)):.2f}"] for t, v in tools.items()]
    ours_cfg = q.get("ours", {})
    s.lines += [f"Output quality against a full-decode reference, input `{name}` ({q['n_images']} distinct payloads; "
                f"ours: {ours_cfg.get('idct', '?')} IDCT, shrink-on-load to at least "
                f"{ours_cfg.get('shrink_on_load_margin', '?')}x the target, {ours_cfg.get('downscale_filter', '?')} "
                "downscale):", ""]
    s.lines += table(["output", "PSNR mean dB", "median", "5th pct", "min", "SSIM mean", "SSIM min",
                      "image-path CPU ms/img"], body, ["---"] + ["---:"] * 7) + [""]
    ours, peer, gap = tools["laion-tasks"], tools["img2dataset"], q["psnr_gap_db"]
    s.lines += [f"- **PSNR, laion-tasks - img2dataset: {gap:+.2f} dB** (mean of per-image differences; "
                f"{q['images_more_than_0_5_db_below_peer']} of {q['n_images']} images more than 0.5 dB below "
                f"img2dataset); SSIM {q['ssim_gap']:+.4f}. Target {DOWNLOAD_PSNR.text}: {verdict(gap, DOWNLOAD_PSNR)}. "
                f"Same content size as img2dataset for {q['same_content_size']} of {q['n_images']} images (it "
                "truncates the scaled side, we round; each is compared with the reference at its own size).", ""]
    if q.get("method"):
        s.lines += [q["method"], ""]
    s.rows.append(Row("download", f"PSNR against a full-decode LANCZOS reference, input `{name}`",
                      f"{ours['psnr_mean_db']:.2f} dB", f"{peer['psnr_mean_db']:.2f} dB (img2dataset)",
                      f"{gap:+.2f} dB", DOWNLOAD_PSNR, gap,
                      f"SSIM {ours['ssim_mean']:.4f} vs {peer['ssim_mean']:.4f}", when, shown=f"{gap:+.2f} dB"))


def render_clip(record: dict, run: dict) -> Section:
    s = Section()
    when = measured(run)
    o, p, c = run["ours"], run["peer"], run.get("correctness", {})
    peer_name = p.get("name", "clip-retrieval")
    s.lines += table(["", "pairs/s", "seconds", "model load s"], [
        ["laion-tasks `clip_score_shard`", f"{o['pairs_per_s']:.2f}", f"{o['seconds']:.1f}", f"{o['load_s']:.1f}"],
        [f"{peer_name} `clip_inference`", f"{p['pairs_per_s']:.2f}", f"{p['seconds']:.1f}", f"{p['load_s']:.1f}"],
        [f"**ratio ours / {peer_name}**", f"**{o['pairs_per_s'] / p['pairs_per_s']:.2f}x**", "", ""],
    ], ["---", "---:", "---:", "---:"]) + [""]
    ours_r, peer_r = o.get("rounds_pairs_per_s", []), p.get("rounds_pairs_per_s", [])
    every = all(a >= b for a, b in zip(ours_r, peer_r)) if ours_r and peer_r else None
    if ours_r:
        s.lines += [f"All rounds (pairs/s, alternating): ours {ours_r}, {peer_name} {peer_r}"
                    + ("" if every is None else f"; ours ahead in {'every' if every else 'not every'} round") + ".", ""]
    ratio = o["pairs_per_s"] / p["pairs_per_s"]
    gpu = (run.get("machine") or {}).get("gpu")
    model = run.get("settings", {}).get("model", "")
    s.rows.append(Row("clip", f"pairs/s, {model + ' ' if model else ''}on {gpu or 'CPU'}", f"{o['pairs_per_s']:,.2f}",
                      f"{p['pairs_per_s']:,.2f} ({peer_name})", f"{ratio:.2f}x",
                      Target(">=", 2.0, ">= 2x clip-retrieval") if gpu else Target(">=", 1.0, "CPU: not slower"),
                      ratio, round_note(ours_r, peer_r, every), when,
                      shown=f"{ratio:.2f}x"))
    if gpu:
        s.rows.append(Row("clip", f"pairs/s on {gpu}", n0(o["pairs_per_s"]), "", "",
                          Target(">=", 5000, ">= 5,000 pairs/s"), o["pairs_per_s"], run.get("bound", ""), when))
    if run.get("diagnosis"):
        s.lines += ["Where the time goes (a profile on the same kind of machine): " + run["diagnosis"], ""]
    if c:
        s.lines += [
            "Correctness (same weights, same images):",
            f"- ours vs open_clip's reference encoding, {c['reference_pairs']} pairs: min cosine image "
            f"{c['ref_img_cos_min']:.5f}, text {c['ref_txt_cos_min']:.5f}.",
            f"- ours vs {peer_name}'s embeddings, {c['peer_pairs']} pairs matched by key: min cosine image "
            f"{c['peer_img_cos_min']:.5f} (mean {c['peer_img_cos_mean']:.5f}), text {c['peer_txt_cos_min']:.5f}.",
            "",
        ]
        low = min(c["ref_img_cos_min"], c["ref_txt_cos_min"])
        s.rows.append(Row("clip", "embeddings vs open_clip reference: min cosine", f"{low:.5f}", "", "",
                          Target(">=", 0.999, ">= 0.999"), low, "", when))
    return s


def round_note(ours: list[float], peer: list[float], every: bool | None) -> str:
    """Ahead in every round or not, and each alternating round's ratio: a best-of ratio alone hides the spread."""
    if every is None:
        return ""
    ratios = ", ".join(f"{a / b:.2f}x" for a, b in zip(ours, peer))
    return f"ahead in {'every' if every else 'not every'} round (round ratios {ratios})"


def clip_gpu_rows(record: dict) -> list[Row]:
    """The GPU targets as 'not measured' when no run on a GPU machine is recorded (render_clip covers one that is)."""
    if any((r.get("machine") or {}).get("gpu") for r in record.get("runs", [])):
        return []
    return [Row("clip", "pairs/s on one GPU (H100 class)", "not measured", "", "", Target(">=", 5000, ">= 5,000 pairs/s"),
                None, "no GPU run is recorded", ""),
            Row("clip", "pairs/s on one GPU vs clip-retrieval", "not measured", "", "",
                Target(">=", 2.0, ">= 2x clip-retrieval"), None, "no GPU run is recorded", "")]


LANGID_NAMES = {"hybrid": "hybrid", "hybrid_previous": "hybrid, previous families", "hybrid_all": "hybrid, all 75",
                "fasttext": "fastText alone", "cld3": "CLD3"}
LANGID_SPEED = Target(">=", 20000, ">= 20,000 strings/s per core")
LANGID_AHEAD = Target(">", 0.0, "hybrid ahead of CLD3 on common languages")


def render_langid_four_sets(run: dict) -> Section:
    """The four-set table (issue 21 item 3): accuracy on the languages both CLD3 and the hybrid can output, per set;
    the short-text sets (Tatoeba held out, NCHLT) carry the target; then speed, the tuning grid, the alt text."""
    s = Section()
    when = measured(run)
    sets: dict[str, dict] = run["four_sets"]
    targeted = [k for k in ("tatoeba-test", "nchlt") if k in sets]

    def acc(st: dict, det: str, key: str = "acc_common") -> str:
        v = st["detectors"].get(det, {}).get(key)
        return "" if v is None else pct(v)

    def gap(st: dict) -> str:
        p = st.get("paired")
        if not p:
            return ""
        lo, hi = p["ci95"]
        return f"{100 * p['diff']:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})"

    s.lines += ["**Accuracy on the common languages of each set** (those both CLD3 and the hybrid can output; top-1, "
                "micro-averaged). Hybrid - CLD3 is in points, with a 95% interval from the paired counts (strings only "
                "one of the two gets right).", ""]
    body = []
    for key, st in sets.items():
        left = ", ".join(st.get("left_out", [])) or "none"
        body.append([f"`{key}`", f"{st['corpus']}; {st['text']}, {st['mean_chars']:.0f} chars avg",
                     f"{st['common_languages']} of {st['languages']} (left out: {left})",
                     f"{n0(st['common_strings'])} of {n0(st['strings'])}",
                     f"**{acc(st, 'hybrid')}**", acc(st, "cld3"), acc(st, "fasttext"), gap(st),
                     acc(st, "hybrid_previous"), acc(st, "hybrid", "macro_common"), acc(st, "cld3", "macro_common"),
                     pct(st["deferred_to_lingua"]) if st.get("deferred_to_lingua") is not None else "",
                     st.get("relation", "")])
    s.lines += table(["set", "text", "common languages", "common strings", "hybrid", "CLD3", "fastText alone",
                      "hybrid - CLD3, points (95%)", "hybrid, previous families", "hybrid, per-language mean",
                      "CLD3, per-language mean", "deferred to lingua", "relation to tuning"], body,
                     ["---", "---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---:",
                      "---"]) + [""]
    s.lines += ["**On the languages all three support** (common languages that lid.176 can output too, so fastText "
                "alone is not charged for languages it lacks), and **over every language of the set** (a language a "
                "detector cannot output counts as its miss; not like for like):", ""]
    s.lines += table(["set", "languages, all three", "hybrid", "CLD3", "fastText alone", "hybrid, every language",
                      "CLD3, every language", "fastText, every language"],
                     [[f"`{k}`", str(st["all3_languages"]), acc(st, "hybrid", "acc_all3"), acc(st, "cld3", "acc_all3"),
                       acc(st, "fasttext", "acc_all3"), acc(st, "hybrid", "acc_all"), acc(st, "cld3", "acc_all"),
                       acc(st, "fasttext", "acc_all")] for k, st in sets.items()],
                     ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]) + [""]
    for key, st in sets.items():
        h, c = st["detectors"]["hybrid"]["acc_common"], st["detectors"]["cld3"]["acc_common"]
        target = LANGID_AHEAD if key in targeted else None
        s.rows.append(Row("langid", f"accuracy on common languages, `{key}` ({st['text']})", pct(h), f"{pct(c)} (CLD3)",
                          f"{100 * (h - c):+.1f} points", target, h - c,
                          "" if target else st.get("relation", ""), when, shown=f"{pct(h)} vs {pct(c)}"))
    if targeted:
        s.lines += ["Target (short text, common languages): "
                    + "; ".join(f"`{k}` hybrid {pct(sets[k]['detectors']['hybrid']['acc_common'])} vs CLD3 "
                                f"{pct(sets[k]['detectors']['cld3']['acc_common'])}: "
                                + verdict(sets[k]["detectors"]["hybrid"]["acc_common"]
                                          - sets[k]["detectors"]["cld3"]["acc_common"], LANGID_AHEAD)
                                for k in targeted) + ".", ""]
    worst = []
    for key in targeted:
        per = sets[key].get("per_language", {})
        behind = sorted(((v["hybrid"] - v["cld3"], lang, v) for lang, v in per.items()
                         if lang not in sets[key].get("left_out", [])), key=lambda t: t[0])[:8]
        if behind:
            worst.append(f"- `{key}`, languages where the hybrid trails CLD3 most: "
                         + ", ".join(f"{lang} {pct(v['hybrid'], 0)} vs {pct(v['cld3'], 0)}" for _, lang, v in behind))
    if worst:
        s.lines += worst + [""]
    speed_cols = [d for d in ("hybrid", "hybrid_previous", "cld3", "fasttext")
                  if any(d in st["detectors"] for st in sets.values())]
    s.lines += ["**Speed on each set**, strings per CPU-second, one core (one pass):", ""]
    s.lines += table(["set", *(LANGID_NAMES[d] for d in speed_cols)],
                     [[f"`{k}`"] + [n0(st["detectors"][d]["rate"]) if st["detectors"].get(d, {}).get("rate") else ""
                                    for d in speed_cols] for k, st in sets.items()],
                     ["---"] + ["---:"] * len(speed_cols)) + [""]
    tuning = run.get("tuning")
    if tuning and tuning.get("candidates"):
        cands = tuning["candidates"]
        base = next((c for c in cands if not c.get("knobs") and not c.get("family_off")), cands[0])
        best = max(cands, key=lambda c: c["dev_acc_common"])
        s.lines += [f"**Tuning on `{tuning['set']}` only** ({n0(tuning['strings'])} strings, "
                    f"{tuning['common_languages']} common languages): the shipped defaults, the previous families, one "
                    "knob moved at a time, each shipped confusable family switched off and each dropped one put back. "
                    "Alt-text figures are one cold pass each (indicative; the speed headline is the best of the timed "
                    "rounds).", ""]
        s.lines += table(["candidate", "dev accuracy (common)", "vs shipped defaults, points", "alt text deferred to lingua",
                          "alt text strings/s"],
                         [[c["candidate"], pct(c["dev_acc_common"], 2),
                           f"{100 * (c['dev_acc_common'] - base['dev_acc_common']):+.2f}", pct(c["alt_deferred"]),
                           n0(c["alt_rate"])] for c in cands], ["---", "---:", "---:", "---:", "---:"]) + [""]
        s.lines += [f"Best on the dev split at any cost: {best['candidate']} ({pct(best['dev_acc_common'], 2)}; "
                    f"shipped defaults {pct(base['dev_acc_common'], 2)})."]
        if tuning.get("rule"):
            s.lines.append(f"Tuning rule: {tuning['rule']}; it picks: {tuning.get('chosen_by_rule') or 'none'}.")
        s.lines.append("")
    alt = run.get("alt_text")
    if alt:
        rate = alt["rate"]
        s.lines += [f"**Real alt text** ({alt['name']}, {n0(alt['n'])} strings, median {alt['median_chars']:.0f} "
                    f"characters; best of {alt.get('rounds', '?')} timed rounds, process CPU time on one core, each round "
                    "starting with lingua's cache of detectors emptied, its language models loaded):", ""]
        warm = alt.get("rate_warm_cache", {})
        s.lines += table(["detector", "strings/s per core", "with lingua's detector cache warm", "en", "multi",
                          "nolang"],
                         [[LANGID_NAMES.get(k, k), n0(rate[k]), n0(warm[k]) if k in warm else "",
                           *(pct(alt["groups"][k][g]) if k in alt.get("groups", {}) else "" for g in ("en", "multi",
                                                                                                   "nolang"))]
                          for k in rate], ["---", "---:", "---:", "---:", "---:", "---:"]) + [""]
        s.rows.append(Row("langid", f"strings/s per core on real alt text ({alt['name']})", n0(rate["hybrid"]),
                          f"{n0(rate['cld3'])} (CLD3)", f"{rate['hybrid'] / rate['cld3']:.2f}x CLD3", LANGID_SPEED,
                          rate["hybrid"], f"{pct(alt['deferred_to_lingua'])} deferred to lingua; process CPU time on a "
                          "shared, loaded machine", when))
        s.lines += [f"Speed on real alt text: hybrid {n0(rate['hybrid'])} strings/s per core "
                    f"({pct(alt['deferred_to_lingua'])} deferred to lingua); target {LANGID_SPEED.text}: "
                    f"{verdict(rate['hybrid'], LANGID_SPEED)}. Measured as process CPU time on the shared machine, not "
                    "in a quiet run.", ""]
    if run.get("rss_mb"):
        s.lines += [f"Peak RSS of our process before the tuning grid (both models, lingua's low-accuracy models of "
                    f"all 75 languages loaded, the bench's texts and predictions held): {n0(run['rss_mb'])} MB.", ""]
    settings = run.get("settings") or {}
    if settings:
        s.lines += ["Settings: " + "; ".join(
            f"{LANGID_NAMES.get(k, k)}: " + (", ".join(f"{kk}={vv}" for kk, vv in v.items()) if isinstance(v, dict)
                                             else str(v)) for k, v in settings.items()) + ".", ""]
    return s


def render_langid(record: dict, run: dict) -> Section:
    s = Section()
    if "four_sets" in run:
        return render_langid_four_sets(run)
    when = measured(run)
    ts = run.get("test_set", {})
    sets = run.get("sets", {})
    if ts:
        s.lines += [
            f"Test set: {ts.get('name', '?')}, {ts.get('languages', '?')} languages"
            + (f" ({ts['origin']})" if ts.get("origin") else "") + "."
            + ("" if ts.get("independent", True) else
               " **Not an independent test**: " + (ts.get("tuned_on") or "the hybrid was tuned on it") + "."),
            "",
        ]
    header = ["set", "strings", "acc. hybrid", "acc. hybrid, all 75", "acc. fastText alone", "acc. CLD3",
              "acc. hybrid (common)", "acc. CLD3 (common)", "strings/s/core hybrid", "hybrid, all 75",
              "fastText alone", "CLD3", "deferred to lingua"]
    body = []
    for name, st in sets.items():
        d = st["detectors"]

        def a(det: str, key: str = "acc") -> str:
            v = d.get(det, {}).get(key)
            return "" if v is None else pct(v)

        def r(det: str) -> str:
            v = d.get(det, {}).get("rate")
            return "" if v is None else n0(v)

        body.append([name, n0(st["n"]), a("hybrid"), a("hybrid_all"), a("fasttext"), a("cld3"), a("hybrid", "acc_common"),
                     a("cld3", "acc_common"), r("hybrid"), r("hybrid_all"), r("fasttext"), r("cld3"),
                     pct(st["deferred_to_lingua"]) if st.get("deferred_to_lingua") is not None else ""])
    alt = run.get("alt_text")
    if alt:
        rate = alt["rate"]
        body.append([f"**real alt text** ({alt['name']}, median {alt['median_chars']} chars)", n0(alt["n"]), "", "", "",
                     "", "", "", f"**{n0(rate['hybrid'])}**", n0(rate.get("hybrid_all", float("nan"))),
                     n0(rate.get("fasttext", float("nan"))), n0(rate["cld3"]), pct(alt["deferred_to_lingua"])])
    s.lines += table(header, body, ["---"] + ["---:"] * 12) + [""]
    ahead = Target(">", 0.0, "ahead of CLD3 on common languages")
    caveat = "" if ts.get("independent", True) else "test set not independent (see below)"
    for name, st in sets.items():
        d = st["detectors"]
        h, c = d.get("hybrid", {}).get("acc_common"), d.get("cld3", {}).get("acc_common")
        if h is None or c is None:
            continue
        s.rows.append(Row("langid", f"accuracy on common languages, {ts.get('name', '')} {name}", pct(h),
                          f"{pct(c)} (CLD3)", f"{100 * (h - c):+.1f} points", ahead, h - c, caveat, when,
                          shown=f"{pct(h)} vs {pct(c)}"))
    compared = [(name, st["detectors"].get("hybrid", {}).get("acc_common"),
                 st["detectors"].get("cld3", {}).get("acc_common")) for name, st in sets.items()]
    compared = [(n, h, c) for n, h, c in compared if h is not None and c is not None]
    if compared:
        s.lines += [
            "On the languages both detectors support, hybrid vs CLD3: "
            + "; ".join(f"{n} {pct(h)} vs {pct(c)} ({'ahead' if h > c else 'behind' if h < c else 'level'})"
                        for n, h, c in compared)
            + f". Target {ahead.text}: " + ", ".join(f"{n} {verdict(h - c, ahead)}" for n, h, c in compared) + ". "
            "The accuracy over all languages counts the languages a detector cannot output as its misses, so it is "
            "not a like-for-like comparison.",
            "",
        ]
    if alt:
        rate = alt["rate"]
        speed = Target(">=", 20000, ">= 20,000 strings/s per core")
        s.rows.append(Row("langid", f"strings/s per core on real alt text ({alt['name']})", n0(rate["hybrid"]),
                          f"{n0(rate['cld3'])} (CLD3)", f"{rate['hybrid'] / rate['cld3']:.2f}x CLD3", speed,
                          rate["hybrid"], f"{pct(alt['deferred_to_lingua'])} deferred to lingua", when))
        s.lines.append(f"Speed on real alt text: hybrid {n0(rate['hybrid'])} strings/s per core; target "
                       f"{speed.text}: {verdict(rate['hybrid'], speed)}.")
        s.lines.append("")
        if alt.get("groups"):
            names = {"hybrid": "hybrid", "hybrid_all": "hybrid, all 75", "fasttext": "fastText alone", "cld3": "CLD3"}
            s.lines += ["Routing of the real alt text (LAION's split at 0.5 confidence):", ""]
            s.lines += table(["detector", "en", "multi", "nolang"],
                             [[names.get(k, k), pct(g["en"]), pct(g["multi"]), pct(g["nolang"])]
                              for k, g in alt["groups"].items()], ["---", "---:", "---:", "---:"]) + [""]
    for name, worst in run.get("worst", {}).items():
        if worst:
            s.lines.append(f"- lowest languages of the hybrid, {name}: "
                           + ", ".join(f"{lang} {pct(h, 0)} (CLD3 {pct(c, 0)})" for lang, h, c in worst))
    if run.get("worst"):
        s.lines.append("")
    if run.get("rss_mb"):
        s.lines += [f"Peak RSS of our process (both models loaded): {n0(run['rss_mb'])} MB.", ""]
    return s


def render_tag(record: dict, run: dict) -> Section:
    s = Section()
    when = measured(run)
    t = run.get("tag")
    if t:
        s.lines += [f"**Tagging** ({t['samples']:,} samples, {t['images']:,} images; {t.get('what', '')}): "
                    f"**{n0(t['samples_per_cpu_s'])} samples per CPU-second** on one core "
                    f"({n0(t['images_per_cpu_s'])} images per CPU-second; wall {t['wall_s']:.1f} s).", ""]
        s.rows.append(Row("tag", "samples per CPU-second, one core (tiny CLIP, lid, PDQ, hash lists)",
                          n0(t["samples_per_cpu_s"]), "", "", None, None, "no runnable peer", when))
    dd = run.get("dedup")
    if dd:
        body = []
        for kind, label in (("exact", "exact (url, alt) + sha256"), ("near", "near-dup only (512-d, cos >= 0.95)")):
            e = dd.get(kind)
            if not e:
                continue
            ts = e["times_s"]
            body.append([label, n0(e["rows"]), str(e["buckets"]), f"{ts['centroids']:.1f}" if "centroids" in ts else "-",
                         f"{ts['partition']:.1f}", f"{ts['buckets']:.1f}", f"{ts['resolve']:.1f}", f"{ts['total']:.1f}",
                         n0(e["rows_per_s"]), f"{n0(e['peak_rss_mb'])} MB"])
        s.lines += table(["dedup run", "rows", "buckets", "centroids s", "partition s", "buckets s", "resolve s",
                          "total s", "rows/s", "peak RSS"], body, ["---"] + ["---:"] * 9) + [""]
        near = dd.get("near")
        if near and "near_recall" in near:
            s.lines += [f"Near-dup recall of the injected copies: {pct(near['near_recall'])} "
                        f"({near['near_found']:,} found, {near['near_injected']:,} injected).", ""]
        if dd.get("exact", {}).get("counts"):
            s.lines += [f"Exact run verdicts: {dd['exact']['counts']}.", ""]
    return s


def _dedup_per_row(entry: dict, impl: str) -> float:
    return entry[impl]["cpu_seconds"] / entry["rows"]


def render_dedup(record: dict, run: dict) -> Section:
    s = Section()
    when = measured(run)
    st = run.get("settings", {})
    results = sorted(run.get("results", []), key=lambda e: e["rows"])
    if not results:
        return s
    base = next((e for e in results if e["rows"] == 1_000_000), results[0])
    base_per = _dedup_per_row(base, "ours")
    body = []
    known = {"seconds", "cpu_seconds", "steps", "vmhwm_kb", "anon_peak_kb", "rows_out", "removed", "planted_pairs",
             "recall_exact", "recall_near", "recall", "precision"}
    other: list[list[Any]] = []

    def f4(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    for e in results:
        for impl in ("ours", "peer"):
            if impl not in e:
                continue
            m = e[impl]
            per = m["cpu_seconds"] / e["rows"]
            ratio = f" ({per / base_per:.2f}x)" if impl == "ours" else ""
            steps = ", ".join(f"{k} {v:.0f}" for k, v in m.get("steps", {}).items()) or "-"
            body.append([f"{e['rows']:,}", impl, n0(m["seconds"]), n0(m["cpu_seconds"]), n0(1 / per),
                         f"{per * 1e6:.0f}{ratio}", steps, f"{gib(m['anon_peak_kb'])} / {gib(m['vmhwm_kb'])}",
                         f4(m.get("recall_exact")), f4(m.get("recall_near")), f4(m.get("precision"))])
            other += [[f"{e['rows']:,}", impl, k, v] for k, v in unknown_figures(m, known)]
        other += [[f"{e['rows']:,}", "", k, v] for k, v in unknown_figures(e, {"rows", "ours", "peer"})]
    s.lines += [
        "Cost per row is taken from CPU time (user + system of the run's process), which the machine's load changes "
        "far less than wall seconds, though not by nothing.",
        "",
        *table(["rows", "impl", "wall s", "CPU s", "rows per CPU-s", f"CPU µs/row (x at {rows_label(base['rows'])})",
                "wall steps (s)", "peak RSS: anon / VmHWM (GiB)", "recall: exact copies", "recall: near copies",
                "precision"], body, ["---:", "---"] + ["---:"] * 4 + ["---"] + ["---:"] * 4),
        "",
    ]
    if other and not run.get("tables"):
        s.lines += table(["rows", "impl", "other recorded figure", "value"], other) + [""]
    cos = st.get("near_cosine")
    gt = st.get("ground_truth", "planted")
    truth_note = ""
    if gt == "planted":
        band = f"cosine {cos[0]}-{cos[1]}" if cos else "their planted cosine"
        truth_note = (f"Recall is measured against the planted pairs only ({band}), not against a brute-force search: "
                      f"pairs between the threshold ({st.get('threshold', '?')}) and {cos[0] if cos else 'the planted band'}"
                      " and the synthetic data's own near duplicates are not counted. Exact copies are found by the "
                      "sha256 step; near recall is reported on its own, never averaged with them.")
        s.lines += [truth_note, ""]
    recall_t = Target(">=", 0.95, ">= 0.95")
    ours = [e for e in results if "ours" in e]
    sizes = " / ".join(rows_label(e["rows"]) for e in ours)
    per_rows = " / ".join(f"{_dedup_per_row(e, 'ours') * 1e6:.0f}" for e in ours)
    peer = [e for e in results if "peer" in e]
    peer_text = ", ".join(f"{_dedup_per_row(e, 'peer') * 1e6:.0f} at {rows_label(e['rows'])}" for e in peer)
    ratio_text = ", ".join(f"{_dedup_per_row(e, 'peer') / _dedup_per_row(e, 'ours'):.1f}x at {rows_label(e['rows'])}"
                           for e in peer)
    big = next((e for e in ours if e["rows"] == 16_000_000), None)
    one_m = next((e for e in ours if e["rows"] == 1_000_000), None)
    growth = (_dedup_per_row(big, "ours") / _dedup_per_row(one_m, "ours")) if big and one_m else None
    scale_t = Target("<=", 1.3, "16M cost per row <= 1.3x 1M")
    between = ", ".join(f"{rows_label(e['rows'])} is {_dedup_per_row(e, 'ours') / base_per:.2f}x "
                        f"{rows_label(base['rows'])}" for e in ours if e["rows"] > base["rows"])
    s.rows.append(Row("dedup", f"CPU-µs per row, exact + near dups, {st.get('dim', 512)}-d: {sizes}", per_rows,
                      f"{peer_text} (previous bucketed dedup)" if peer else "", ratio_text, scale_t, growth,
                      (between + ("" if big else "; 16M not run")).strip("; "), when,
                      shown="16M not run" if growth is None else f"{growth:.2f}x"))
    lines = []
    for e in ours:
        rn = e["ours"].get("recall_near")
        s.rows.append(Row("dedup", f"near recall, {rows_label(e['rows'])} rows ({gt} pairs)",
                          f4(rn), f4(e["peer"].get("recall_near")) if "peer" in e else "", "", recall_t, rn,
                          "planted pairs only, not brute force" if gt == "planted" else "", when))
        lines.append(f"{rows_label(e['rows'])}: {f4(rn)} ({verdict(rn, recall_t)})")
    precisions = [e["ours"]["precision"] for e in ours if e["ours"].get("precision") is not None]
    if precisions:
        s.rows.append(Row("dedup", f"precision of removed rows, {sizes}", " / ".join(f"{p:.4f}" for p in precisions),
                          "", "", Target(">=", 0.99, ">= 0.99"), min(precisions), "", when,
                          shown=f"lowest {min(precisions):.4f}"))
    largest = ours[-1]
    if st.get("memory_limit"):
        limit = memory_bytes(st["memory_limit"])
        anon = largest["ours"]["anon_peak_kb"] * 1024
        s.rows.append(Row("dedup", f"peak anonymous RSS at {rows_label(largest['rows'])}", f"{anon / 2**30:.2f} GiB", "",
                          "", Target("<", limit / 2**30, f"< memory_limit ({st['memory_limit']})"), anon / 2**30,
                          f"VmHWM {gib(largest['ours']['vmhwm_kb'])} GiB counts cached pages of memory-mapped files",
                          when))
    s.lines += [
        f"Targets: near recall {recall_t.text} at each size: " + "; ".join(lines) + ". "
        "Cost per row at 16M <= 1.3x that at 1M: "
        + ("16M was not run" if growth is None else f"{growth:.2f}x ({verdict(growth, scale_t)})")
        + (f"; {between}" if between else "") + ".",
        "",
    ]
    return s


CURATE_IMPLS = {"one_scan": ("one scan for all subsets", 1), "scan_per_subset": ("one scan per subset (previous DAG)", 7)}


def render_curate(record: dict, run: dict) -> Section:
    s = Section()
    when = measured(run)
    st = run.get("settings", {})
    results = sorted(run.get("results", []), key=lambda e: e["rows"])
    if not results:
        return s
    with_dedup = st.get("dedup_verdicts")
    body, other, verdicts = [], [], []
    known = {"seconds", "cpu_seconds", "vmhwm_kb", "anon_peak_kb", "rows", "status", "scans", "duplicates"}
    for e in results:
        dd = e.get("dedup") or {}
        if dd.get("removed") is not None:
            reasons = ", ".join(f"{k.removeprefix('drop:dup_')} {n0(v)}" for k, v in dd.get("by_reason", {}).items())
            verdicts.append(f"{rows_label(e['rows'])}: {n0(dd['removed'])} rows ({pct(dd['removed'] / e['rows'])}) named "
                            f"duplicates ({reasons}), from {n0(dd.get('near_pairs', 0))} near pairs"
                            + (f"; written in {dd['seconds']:.0f} s, not counted" if "seconds" in dd else ""))
        for impl, (label, scans) in CURATE_IMPLS.items():
            m = e.get(impl)
            if not m:
                continue
            dups = m.get("duplicates")
            body.append([f"{e['rows']:,}", label, str(m.get("scans", scans)), n0(m["seconds"]), f"{m['cpu_seconds']:.1f}",
                         n0(e["rows"] / m["cpu_seconds"]), f"{gib(m['anon_peak_kb'])} / {gib(m['vmhwm_kb'])}",
                         n0(sum(m["rows"].values())),
                         n0(sum(dups.values())) if dups else ("none: no verdicts" if not with_dedup else "?")])
            other += [[f"{e['rows']:,}", impl, k, v] for k, v in unknown_figures(m, known)]
        other += [[f"{e['rows']:,}", "", k, v] for k, v in unknown_figures(e, {"rows", "dedup", *CURATE_IMPLS})]
    s.lines += [
        "Rates are per CPU-second (user + system of the child process), which the machine's load does not change.",
        "",
        *table(["rows", "impl", "snapshot scans", "wall s", "CPU s", "rows per CPU-s (all subsets)",
                "peak RSS anon / VmHWM (GiB)", "rows written (sum over subsets)",
                "duplicates dropped within subsets (sum)"], body, ["---:", "---"] + ["---:"] * 7),
        "",
    ]
    if verdicts:
        s.lines += ["Dedup verdicts of the generated snapshot (dedup's own partition and resolve steps): "
                    + "; ".join(verdicts) + ".", ""]
    if other and not run.get("tables"):
        s.lines += table(["rows", "impl", "other recorded figure", "value"], other) + [""]
    join = "with the dedup join" if with_dedup else "**without dedup verdicts** (no dedup join)"
    ours = [e for e in results if "one_scan" in e]
    per = {e["rows"]: e["rows"] / e["one_scan"]["cpu_seconds"] for e in ours}
    peers = [e for e in results if "scan_per_subset" in e and "one_scan" in e]
    s.rows.append(Row("curate", f"rows per CPU-s, 7 subsets, {join}: " + " / ".join(rows_label(r) for r in per),
                      " / ".join(n0(v) for v in per.values()) + " (one scan)",
                      ", ".join(f"{n0(e['rows'] / e['scan_per_subset']['cpu_seconds'])} at {rows_label(e['rows'])} "
                                "(one scan per subset, same code)" for e in peers),
                      ", ".join(f"{e['scan_per_subset']['cpu_seconds'] / e['one_scan']['cpu_seconds']:.1f}x at "
                                f"{rows_label(e['rows'])}" for e in peers), None, None,
                      (f"cost per row at {rows_label(max(per))} {per[min(per)] / per[max(per)]:.2f}x that at "
                       f"{rows_label(min(per))}") if len(per) > 1 else "", when))
    for e in peers:
        same = e["one_scan"]["rows"] == e["scan_per_subset"]["rows"]
        s.rows.append(Row("curate", f"same rows per subset as one scan per subset, {rows_label(e['rows'])}",
                          n0(sum(e["one_scan"]["rows"].values())), n0(sum(e["scan_per_subset"]["rows"].values())), "",
                          Target("==", True, "identical"), same, "", when, shown="identical" if same else "differ"))
    if st.get("memory_limit") and ours:
        big = ours[-1]
        limit = memory_bytes(st["memory_limit"])
        anon = big["one_scan"]["anon_peak_kb"] * 1024
        s.rows.append(Row("curate", f"peak anonymous RSS at {rows_label(big['rows'])}, {join}", f"{anon / 2**30:.2f} GiB",
                          "", "", Target("<", limit / 2**30, f"< duckdb_memory_limit ({st['memory_limit']})"),
                          anon / 2**30, "", when))
    return s


def render_index(record: dict, run: dict) -> Section:
    s = Section()
    when = measured(run)
    sizes = run.get("sizes", [])
    k = run.get("settings", {}).get("k", 40)
    body = []
    for r in sizes:
        h = r["http"]
        flat = r.get("flat_p50_ms")
        body.append([f"{r['n']:,}", f"`{r['index_key']}`", f"{r['served']['nprobe']} / {r['served']['k_factor']}",
                     n0(r["build_s"]), f"{r['build_peak_rss_gb']:.2f}", f"{r['index_gb']:.2f}", f"{h['p50_ms']:.1f}",
                     f"{h['p99_ms']:.1f}", n0(h["qps_4_clients"]), f"{h['recall_at_40']:.3f}",
                     f"{h['server_rss_anon_gb']:.2f} / {h['server_rss_file_gb']:.2f}",
                     "n/a" if flat is None else f"{flat:.1f}",
                     "n/a (fp32 matrix does not fit)" if flat is None else
                     f"{r.get('flat_over_ours_p50') or flat / h['p50_ms']:.1f}x"])
    s.lines += table(["vectors", "index", "nprobe / k_factor", "build s", "build peak RSS GB", "index on disk GB",
                      "HTTP p50 ms", "HTTP p99 ms", "QPS (4 clients)", f"recall@{k}", "server RSS GB (anon / file)",
                      "flat exact p50 ms", "p50 ratio flat/ours"], body) + [""]
    s.lines += ["Build phases (s): " + "; ".join(
        f"{r['n']:,}: " + ", ".join(f"{a}={b}" for a, b in r.get("build_phases_s", {}).items()) for r in sizes), ""]
    sweep = [[f"{r['n']:,}", str(w["nprobe"]), str(w["k_factor"]), f"{w['p50_ms']:.2f}", f"{w['p99_ms']:.2f}",
              f"{w['recall_at_40']:.3f}"] for r in sizes for w in r.get("sweep", [])]
    if sweep:
        s.lines += ["In-process FAISS search only (no HTTP, no metadata), 1 query at a time:", ""]
        s.lines += table(["vectors", "nprobe", "k_factor", "p50 ms", "p99 ms", f"recall@{k}"], sweep) + [""]
    s.lines += ["Exact ground truth (chunked fp32 brute force, queries batched): " + "; ".join(
        f"{r['n']:,}: {r['queries']} queries in {r['exact_s']:.0f} s" for r in sizes if "exact_s" in r), ""]
    for r in sizes:
        h = r["http"]
        label = rows_label(r["n"])
        s.rows.append(Row("index", f"{label} x 512: HTTP p50 at k={k}", f"{h['p50_ms']:.1f} ms",
                          f"{r['flat_p50_ms']:.1f} ms (FAISS flat, in-process)" if r.get("flat_p50_ms") else "",
                          f"{r['flat_p50_ms'] / h['p50_ms']:.0f}x" if r.get("flat_p50_ms") else "",
                          Target("<", 20, "< 20 ms") if r["n"] >= 10_000_000 else None,
                          h["p50_ms"] if r["n"] >= 10_000_000 else None, f"p99 {h['p99_ms']:.0f} ms", when))
        if r["n"] >= 10_000_000:
            s.rows.append(Row("index", f"{label} x 512: recall@{k} over HTTP", f"{h['recall_at_40']:.3f}", "", "",
                              Target(">=", 0.95, ">= 0.95"), h["recall_at_40"], "", when))
    return s


def render_eval(record: dict, run: dict) -> Section:
    s = Section()
    when = measured(run)
    cases = run.get("cases", [])

    def f(v: float | None) -> str:
        return "n/a" if v is None or v != v else f"{v:.4f}"

    body = [[c["case"], str(c["n_images"]), f"{c['n_classes']} x {c['n_templates']}",
             f"{f(c['ours']['acc1'])} / {f(c['peer']['acc1'])}", f"{f(c['ours']['acc5'])} / {f(c['peer']['acc5'])}",
             f"{f(c['ours']['mean_per_class_recall'])} / {f(c['peer']['mean_per_class_recall'])}",
             str(c["predictions_equal"]), str(c["top5_equal"]), f"{c['max_abs_logit_diff']:.3g}", f"{c['ours_s']:.1f}",
             f"{c['peer_compute_s']:.1f}", f"{c.get('peer_over_ours', c['peer_compute_s'] / c['ours_s']):.2f}"]
            for c in cases]
    s.lines += table(["case", "images", "classes x templates", "top-1 ours / peer", "top-5 ours / peer",
                      "mean recall ours / peer", "predictions equal", "top-5 equal", "max abs logit diff", "ours s",
                      "peer s (compute)", "ratio peer/ours"], body) + [""]
    same = bool(cases) and all(c["predictions_equal"] and c["top5_equal"] is not False and c["max_abs_logit_diff"] == 0
                               for c in cases)
    diff = max((c["max_abs_logit_diff"] for c in cases), default=float("nan"))
    s.rows.append(Row("eval", "zero-shot parity with CLIP_benchmark (same random model)",
                      "identical predictions and top-5" if same else "predictions differ", "", f"max logit diff {diff:.3g}",
                      Target("==", True, "identical"), same, "", when, shown="identical" if same else "differ"))
    return s


# Run keys each renderer reads; any other key's figures are shown generically (see ``other_run_figures``).
COMMON_RUN_KEYS = {"label", "date", "command", "machine", "source", "setup", "settings", "notes", "tables", "checks"}
RUN_KEYS: dict[str, set[str]] = {
    "extract": {"input", "ours", "peer", "ratio", "floors", "parity", "cpu_breakdown_s"},
    "download": {"inputs"},
    "clip": {"ours", "peer", "correctness"},
    "langid": {"test_set", "sets", "alt_text", "worst", "rss_mb", "four_sets", "tuning"},
    "tag": {"tag", "dedup"},
    "dedup": {"results"},
    "curate": {"results"},
    "index": {"sizes"},
    "eval": {"cases"},
}


def other_run_figures(name: str, run: dict) -> list[str]:
    """Figures under run keys the bench's renderer does not read: a table per list of objects, one for the rest.

    Skipped when the run carries its own ``tables`` (it then shows what it wants shown)."""
    if run.get("tables"):
        return []
    lines: list[str] = []
    rest: dict[str, Any] = {}
    for key, value in run.items():
        if key in COMMON_RUN_KEYS or key in RUN_KEYS.get(name, set()):
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            flat = [dict(unknown_figures(v, set())) for v in value]
            columns = list(dict.fromkeys(k for row in flat for k in row))
            lines += [f"**{key}**", "", *table(columns, [[row.get(c, "") for c in columns] for row in flat]), ""]
        else:
            rest[key] = value
    figures = unknown_figures(rest, set())
    if figures:
        lines += table(["recorded figure", "value"], [[k, v] for k, v in figures]) + [""]
    return lines


RENDERERS: dict[str, RunRenderer] = {
    "extract": render_extract, "download": render_download, "clip": render_clip, "langid": render_langid,
    "tag": render_tag, "dedup": render_dedup, "curate": render_curate, "index": render_index, "eval": render_eval,
}


# ---------------------------------------------------------------- assembling RESULTS.md


def load_records(results_dir: Path = RESULTS_DIR) -> dict[str, dict]:
    """Every bench/results/*.json, checked for what the generator needs (errors name the file and key)."""
    records = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("runs"), list):
            raise ValueError(f"{path}: expected an object with a 'runs' list (bench/README.md)")
        for i, run in enumerate(record["runs"]):
            for key in ("date", "machine"):
                if key not in run:
                    raise ValueError(f"{path}: runs[{i}] has no {key!r}")
        records[record.get("bench", path.stem)] = record
    return records


def render_record(name: str, record: dict) -> Section:
    """A bench's section: its runs (each with date and machine), then its record-level notes/tables/checks."""
    out = Section(lines=[f"## {record.get('title', name)}", ""])
    renderer = RENDERERS.get(name)
    runs = record.get("runs", [])
    for run in runs:
        if len(runs) > 1:
            out.lines += [f"### {run.get('label', run.get('date', ''))}", ""]
        out.lines += run_header(run)
        if renderer is not None:
            try:
                part = renderer(record, run)
            except (KeyError, TypeError, ZeroDivisionError) as exc:
                raise ValueError(f"bench/results/{name}.json, run {run.get('label')!r}: cannot render ({exc!r})") from exc
            out.rows += part.rows
            out.lines += part.lines
        out.lines += other_run_figures(name, run)
        rows, lines = generic_parts(run, name, measured(run))
        out.rows += rows
        out.lines += lines
    if name == "clip":
        out.rows += clip_gpu_rows(record)
    rows, lines = generic_parts(record, name, "")
    out.rows += rows
    out.lines += lines
    return out


def ordered(records: dict[str, dict]) -> list[str]:
    return [n for n in ORDER if n in records] + sorted(n for n in records if n not in ORDER)


def render_results(records: dict[str, dict]) -> str:
    sections = {name: render_record(name, records[name]) for name in ordered(records)}
    rows = [r for s in sections.values() for r in s.rows]
    machines = sorted({describe_machine({k: v for k, v in (run.get("machine") or {}).items() if k != "load"})
                       for rec in records.values() for run in rec.get("runs", [])})
    gpu_runs = [f"{name} ({run.get('date', '?')}, {run['machine']['gpu']})" for name, rec in records.items()
                for run in rec.get("runs", []) if (run.get("machine") or {}).get("gpu")]
    lines = [
        "# Benchmark results",
        "",
        "<!-- Generated by `.venv/bin/python bench/collect_results.py` from bench/results/*.json; do not edit. -->",
        "",
        "Every figure below comes from a recorded run in `bench/results/<bench>.json` (format: "
        "[README.md](README.md)); each figure set states its date and machine. A target is marked met only where "
        "the recorded figure meets it. Machines of the recorded runs:",
        "",
        *[f"- {m}" for m in machines],
        "",
        ("GPU figures: " + ", ".join(gpu_runs) + ".") if gpu_runs else
        "**GPU figures: none recorded.** Every run below ran on CPU; GPU targets are not measured.",
        "",
        *table(["stage", "figure", "ours", "peer", "ratio", "target", "verdict", "note", "measured (date; machine)"],
               [[r.stage, r.figure, r.ours, r.peer, r.ratio, r.target.text if r.target else "", r.verdict(), r.comment,
                 r.measured] for r in rows], ["---", "---", "---:", "---:", "---:", "---", "---", "---", "---"]),
        "",
    ]
    for s in sections.values():
        lines += ["---", "", *s.lines]
    lines += ["---", "", "## Targets", "", "Every target above, with its recorded figure:", ""]
    for r in rows:
        if r.target is None:
            continue
        shown = r.shown or r.ours
        tail = "" if r.value is None else f" ({shown})"
        lines.append(f"- {r.stage}: {r.figure}: target {r.target.text}: {r.verdict()}{tail}.")
    met = sum(1 for r in rows if r.target and r.verdict() == "met")
    total = sum(1 for r in rows if r.target)
    lines += ["", f"{met} of {total} targets met; the others are not met or not measured.", ""]
    return "\n".join(_tidy(lines))


def _tidy(lines: list[str]) -> list[str]:
    """No trailing spaces, no runs of blank lines (the file is compared byte for byte by the test)."""
    out: list[str] = []
    for line in "\n".join(lines).split("\n"):
        line = line.rstrip()
        if line == "" and (not out or out[-1] == ""):
            continue
        out.append(line)
    while out and out[-1] == "":
        out.pop()
    return out + [""]


# ---------------------------------------------------------------- SCALE.md


# Assumptions about one Common Crawl snapshot (not measurements; SCALE.md lists their sources).
SNAPSHOT = {
    "wat_files": 90_000,
    "pages": 3.2e9,
    "wat_records": 9.5e9,
    "candidates": 4e9,
    "download_success": 0.6,
    "kept_vectors": 250e6,
    "cpu_hour_usd": 0.04,
    "gpu_hour_usd": 2.50,
    "clip_target_pairs_s": 5000,
    "node_cores": 16,
    "nodes": 25,
}


def _latest(records: dict[str, dict], name: str) -> dict | None:
    runs = records.get(name, {}).get("runs", [])
    return runs[-1] if runs else None


def scale_values(records: dict[str, dict]) -> dict[str, str]:
    """The figures SCALE.md quotes, each computed from the recorded runs (or 'not measured')."""
    a = SNAPSHOT
    images = a["candidates"] * a["download_success"]
    v: dict[str, str] = {
        "wat_files": f"{a['wat_files']:,}", "pages": f"{a['pages'] / 1e9:.1f} billion",
        "wat_records": f"{a['wat_records'] / 1e9:.1f} billion", "candidates": f"{a['candidates'] / 1e9:.0f} billion",
        "success": pct(a["download_success"], 0), "images": f"{images / 1e9:.1f} B",
        "failed": f"{(a['candidates'] - images) / 1e9:.1f} B", "cpu_usd": f"${a['cpu_hour_usd']:.2f}",
        "gpu_usd": f"${a['gpu_hour_usd']:.2f}", "kept_vectors": f"{a['kept_vectors'] / 1e6:.0f} M",
        "node_cores": str(a["node_cores"]), "nodes": str(a["nodes"]),
    }
    hours_lo = hours_hi = 0.0
    missing: list[str] = []

    def add(lo: float, hi: float | None = None) -> None:
        nonlocal hours_lo, hours_hi
        hours_lo += lo
        hours_hi += hi if hi is not None else lo

    # extract: records per second, one pinned core
    run = _latest(records, "extract")
    if run:
        rate = run["ours"]["records_per_s"]
        h = a["wat_records"] / rate / 3600
        add(h)
        v["extract_rate"] = f"{n0(rate)} WAT records/s ({run['ratio']['best_wall']:.2f}x {run['peer'].get('name', 'the peer')})"
        v["extract_hours"] = f"~{n0(h)}"
        v["extract_when"] = measured(run)
    else:
        missing.append("extract")
        v.update(extract_rate="not measured", extract_hours="n/a", extract_when="")
    # download: steady CPU per image, best round, over the recorded inputs
    run = _latest(records, "download")
    if run and run.get("inputs"):
        steady = {n: _best(r["rounds"], "ours", "steady_cpu_ms_per_img", min) for n, r in run["inputs"].items()}
        lo, hi = min(steady.values()), max(steady.values())
        add(images * lo / 1000 / 3600, images * hi / 1000 / 3600)
        v["download_rate"] = (" to ".join(dict.fromkeys([f"{1000 / hi:.0f}", f"{1000 / lo:.0f}"]))
                              + " images per CPU-second (steady " + ", ".join(f"{ms:.2f} ms on `{n}`" for n, ms in
                                                                              steady.items()) + ")")
        v["download_hours"] = f"~{n0(images * lo / 3.6e6)}-{n0(images * hi / 3.6e6)}"
        v["download_when"] = measured(run)
    else:
        missing.append("download")
        v.update(download_rate="not measured", download_hours="n/a", download_when="")
    # clip: CPU rate per core; GPU only if a GPU run is recorded
    clip = records.get("clip", {})
    cpu_runs = [r for r in clip.get("runs", []) if not (r.get("machine") or {}).get("gpu")]
    gpu_runs = [r for r in clip.get("runs", []) if (r.get("machine") or {}).get("gpu")]
    if cpu_runs:
        r = cpu_runs[-1]
        v["clip_cpu_rate"] = f"{r['ours']['pairs_per_s'] / r['machine']['cpus']:.1f} pairs/s per core on CPU"
        v["clip_when"] = measured(r)
    else:
        v.update(clip_cpu_rate="CPU: not measured", clip_when="")
    if gpu_runs:
        r = gpu_runs[-1]
        gpu_rate = r["ours"]["pairs_per_s"]
        v["clip_gpu_rate"] = f"{n0(gpu_rate)} pairs/s on {r['machine']['gpu']} (measured {r['date']})"
        v["clip_gpu_basis"] = f"at the rate measured on one {r['machine']['gpu'].split(' x ', 1)[-1]}"
        v["clip_when"] = ((v["clip_when"] + "; GPU ") if v.get("clip_when") else "GPU ") + measured(r)
    else:
        gpu_rate = a["clip_target_pairs_s"]
        v["clip_gpu_rate"] = f"GPU: **not measured** (target {n0(gpu_rate)} pairs/s per H100)"
        v["clip_gpu_basis"] = "at the target rate, which no recorded run has measured"
    gpu_hours = images / gpu_rate / 3600
    v["clip_gpu_hours"] = f"~{n0(gpu_hours)}"
    # tag
    run = _latest(records, "tag")
    if run and run.get("tag"):
        rate = run["tag"]["samples_per_cpu_s"]
        add(images / rate / 3600)
        v["tag_rate"] = f"{n0(rate)} samples per CPU-second (tiny CLIP)"
        v["tag_hours"] = f"~{n0(images / rate / 3600)}"
        v["tag_when"] = measured(run)
    else:
        missing.append("tag")
        v.update(tag_rate="not measured", tag_hours="n/a", tag_when="")
    # dedup: cost per row at the largest recorded size
    run = _latest(records, "dedup")
    if run and run.get("results"):
        ours = sorted((e for e in run["results"] if "ours" in e), key=lambda e: e["rows"])
        big = ours[-1]
        per = _dedup_per_row(big, "ours")
        add(images * per / 3600)
        v["dedup_rate"] = (", ".join(f"{_dedup_per_row(e, 'ours') * 1e6:.0f}" for e in ours) + " CPU-µs per row at "
                           + ", ".join(rows_label(e["rows"]) for e in ours) + " rows")
        v["dedup_hours"] = f"~{n0(images * per / 3600)}"
        v["dedup_largest"] = rows_label(big["rows"])
        v["dedup_us"] = f"{per * 1e6:.0f}"
        v["dedup_rss"] = f"{big['ours']['anon_peak_kb'] / 2**20:.2f} GiB"
        steps = big["ours"].get("steps", {})
        total = sum(steps.values()) or float("nan")
        v["dedup_steps"] = ", ".join(f"{k} {pct(s / total, 0)}" for k, s in steps.items()) or "not recorded"
        v["dedup_table"] = "\n".join(_scale_dedup_table(run))
        rec = [e["ours"].get("recall_near") for e in ours if e["ours"].get("recall_near") is not None]
        t = Target(">=", 0.95, ">= 0.95")
        v["dedup_recall"] = "; ".join(f"{rows_label(e['rows'])} {e['ours']['recall_near']:.4f} "
                                      f"({verdict(e['ours']['recall_near'], t)})" for e in ours
                                      if e["ours"].get("recall_near") is not None)
        v["dedup_recall_range"] = f"{min(rec):.3f}-{max(rec):.3f}" if rec else "not measured"
        v["dedup_when"] = measured(run)
        v["dedup_16m"] = ("16M rows: " + (f"{_dedup_per_row(next(e for e in ours if e['rows'] == 16_000_000), 'ours') * 1e6:.0f}"
                                          " CPU-µs per row" if any(e["rows"] == 16_000_000 for e in ours) else "not run"))
    else:
        missing.append("dedup")
        v.update(dedup_rate="not measured", dedup_hours="n/a", dedup_largest="", dedup_us="n/a", dedup_rss="n/a",
                 dedup_steps="not recorded", dedup_table="", dedup_recall="not measured",
                 dedup_recall_range="not measured", dedup_when="", dedup_16m="")
    # curate: rows per CPU-second, one scan, at the largest recorded size
    cur = records.get("curate", {})
    entries = [(r, e) for r in cur.get("runs", []) for e in r.get("results", []) if "one_scan" in e]
    if entries:
        run, e = max(entries, key=lambda re_: (re_[1]["rows"], bool(re_[0].get("settings", {}).get("dedup_verdicts"))))
        rate = e["rows"] / e["one_scan"]["cpu_seconds"]
        add(a["candidates"] / rate / 3600)
        join = "with" if run.get("settings", {}).get("dedup_verdicts") else "without"
        v["curate_rate"] = (f"{n0(rate)} rows per CPU-second for all seven subsets at {rows_label(e['rows'])} rows "
                            f"({join} the dedup join)")
        v["curate_hours"] = f"~{n0(a['candidates'] / rate / 3600)}"
        v["curate_when"] = measured(run)
        v["curate_text"] = "\n".join(_scale_curate_text(cur))
    else:
        missing.append("curate")
        v.update(curate_rate="not measured", curate_hours="n/a", curate_when="", curate_text="Not measured.")
    # index: build time of the largest index, scaled linearly to the kept subset
    run = _latest(records, "index")
    if run and run.get("sizes"):
        big = max(run["sizes"], key=lambda r: r["n"])
        cores = run["machine"]["cpus"]
        h = big["build_s"] * cores * a["kept_vectors"] / big["n"] / 3600
        add(h)
        v["index_rate"] = f"{rows_label(big['n'])} vectors built in {n0(big['build_s'])} s on {cores} cores"
        v["index_hours"] = f"~{n0(h)}"
        v["index_when"] = measured(run)
    else:
        missing.append("index")
        v.update(index_rate="not measured", index_hours="n/a", index_when="")
    v["cpu_hours"] = f"{n0(hours_lo)}-{n0(hours_hi)}" if hours_lo != hours_hi else n0(hours_lo)
    v["node_hours"] = f"{n0(hours_lo / a['node_cores'])}-{n0(hours_hi / a['node_cores'])}"
    v["fleet_hours"] = f"{hours_lo / a['node_cores'] / a['nodes']:.0f}-{hours_hi / a['node_cores'] / a['nodes']:.0f}"
    v["cpu_cost"] = f"${n0(hours_lo * a['cpu_hour_usd'])}-{n0(hours_hi * a['cpu_hour_usd'])}"
    v["gpu_cost"] = f"${n0(gpu_hours * a['gpu_hour_usd'])}"
    v["total_cost"] = f"${n0(hours_lo * a['cpu_hour_usd'] + gpu_hours * a['gpu_hour_usd'])}-" \
                      f"{n0(hours_hi * a['cpu_hour_usd'] + gpu_hours * a['gpu_hour_usd'])}"
    v["missing"] = ("Stages without a recorded run, left out of the totals: " + ", ".join(missing) + ".") if missing else ""
    return v


def _f3(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _scale_dedup_table(run: dict) -> list[str]:
    body = []
    st = run.get("settings", {})
    for e in sorted(run["results"], key=lambda e: e["rows"]):
        for impl, label in (("ours", f"{e['rows']:,}"), ("peer", f"previous bucketed dedup at {e['rows']:,}")):
            if impl not in e:
                continue
            m = e[impl]
            body.append([label, f"{_dedup_per_row(e, impl) * 1e6:.0f}", f"{gib(m['anon_peak_kb'])} GiB",
                         f"{_f3(m.get('recall_exact'))} / {_f3(m.get('recall_near'))}", _f3(m.get("precision"))])
    if not any(e["rows"] == 16_000_000 for e in run["results"]):
        body.append(["16,000,000", "not run", "", "", ""])
    return table([f"rows (synthetic {st.get('dim', 512)}-d fp16)", "CPU-µs per row", "peak RSS (anon)",
                  "recall: exact / near copies", "precision"], body, ["---:"] * 5)


def _scale_curate_text(cur: dict) -> list[str]:
    out = []
    for run in cur.get("runs", []):
        st = run.get("settings", {})
        join = "with dedup verdicts (the dedup join measured)" if st.get("dedup_verdicts") else \
            "without dedup verdicts (the dedup join not measured)"
        parts = []
        for e in sorted(run.get("results", []), key=lambda e: e["rows"]):
            if "one_scan" not in e:
                continue
            o = e["one_scan"]
            text = (f"at {rows_label(e['rows'])} rows {n0(e['rows'] / o['cpu_seconds'])} rows per CPU-second for all "
                    f"seven together, peak anonymous memory {gib(o['anon_peak_kb'])} GiB")
            if "scan_per_subset" in e:
                p = e["scan_per_subset"]
                text += (f", against {n0(e['rows'] / p['cpu_seconds'])} for one scan per subset "
                         f"({p['cpu_seconds'] / o['cpu_seconds']:.1f}x)")
            parts.append(text)
        if parts:
            out.append(f"- {run.get('date', '?')[:10]}, {join}, {short_machine(run.get('machine') or {})}: "
                       + "; ".join(parts) + f"; `duckdb_memory_limit={st.get('memory_limit', '?')}`.")
    return out


def render_scale(records: dict[str, dict], template: str) -> str:
    values = scale_values(records)

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            raise KeyError(f"{SCALE_TEMPLATE.name}: no value for {{{{{key}}}}} (known: {sorted(values)})")
        return values[key]

    return "\n".join(_tidy(re.sub(r"\{\{(\w+)\}\}", sub, template).split("\n")))


# ---------------------------------------------------------------- entry point


README_BEGIN = "<!-- bench:headlines (generated by bench/collect_results.py from bench/results/*.json) -->"
README_END = "<!-- /bench:headlines -->"


def render_readme_headlines(records: dict[str, dict]) -> str:
    """The README's benchmark lines: per stage, how many targets the recorded runs meet and each one they miss."""
    rows = [r for name in ordered(records) for r in render_record(name, records[name]).rows if r.target]
    lines: list[str] = []
    for stage in dict.fromkeys(r.stage for r in rows):
        mine = [r for r in rows if r.stage == stage]
        met = [r for r in mine if r.verdict() == "met"]
        missed = [f"{r.figure}: {'not measured' if r.value is None else r.shown or r.ours} (target {r.target.text})"  # type: ignore[union-attr]
                  for r in mine if r.verdict() != "met"]
        lines.append(f"- **{stage}**: {len(met)} of {len(mine)} targets met"
                     + (f"; not met: {'; '.join(missed)}." if missed else "."))
    return "\n".join([README_BEGIN, *lines, README_END])


def readme_with_headlines(readme: str, records: dict[str, dict]) -> str:
    """README.md with its generated block replaced (the block must exist once)."""
    start, end = readme.find(README_BEGIN), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README.md: the lines {README_BEGIN!r} ... {README_END!r} are missing")
    return readme[:start] + render_readme_headlines(records) + readme[end + len(README_END):]


def outputs(results_dir: Path = RESULTS_DIR) -> dict[Path, str]:
    """What RESULTS.md, SCALE.md and README.md's headline block must contain, from the JSON under ``results_dir``."""
    records = load_records(results_dir)
    return {RESULTS_MD: render_results(records), SCALE_MD: render_scale(records, SCALE_TEMPLATE.read_text()),
            README_MD: readme_with_headlines(README_MD.read_text(), records)}


def write_all() -> None:
    for path, text in outputs().items():
        path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether the files are up to date")
    args = parser.parse_args()
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print("out of date with bench/results/*.json: " + ", ".join(str(p.relative_to(REPO)) for p in stale)
              + " (run .venv/bin/python bench/collect_results.py)", file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
