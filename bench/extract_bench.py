"""Extraction throughput on one core: our ``extract_wat`` against cc2dataset, same input, same run.

    .venv/bin/python bench/extract_bench.py [--rounds 3] [--min-mb 100] [--core N]

Input: the real CC-MAIN-2016-40 WAT records in ``../shared/data/wat/cc-2016-40_head500/``
(500 metadata records, one gzip member each), concatenated until the file is >= 100 MB.
Each measurement runs in a fresh subprocess pinned to the same core (``sched_setaffinity``):
ours with this project's interpreter, the peer (cc2dataset 1.5.0's
``extract_documents_from_wat(stream, "image")``) with the interpreter of its own venv,
created here if missing. Rounds alternate ours/peer so that load from other processes
hits both alike; we report the best and the median round, wall and CPU time.

Parity runs both on the original (not replicated) file and compares the sets of
(url, alt) pairs after the documented filters: whitespace normalised, alt >= 5 characters,
http(s) only, deduplicated. Figures go to ``bench/results/extract.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LAION_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCE = SHARED / "wat/cc-2016-40_head500/CC-MAIN-20160924173739-00000-ip-10-143-35-109.head500.warc.wat.gz"
PEER_VENV = Path(os.environ.get("CC2DATASET_VENV", REPO.parent / "peers" / "cc2dataset"))
PEER_SPEC = "cc2dataset==1.5.0"
RESULTS = REPO / "bench" / "results" / "extract.md"

OURS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    core, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.sched_setaffinity(0, {core})
    from laion_tasks.config import ExtractConfig
    from laion_tasks.stages.extract import extract_wat
    import fastwarc.warc, pyarrow.parquet  # imported before timing, like the peer's imports
    import pandas  # pyarrow imports it lazily on the first pa.array (~0.2 s, once per process)
    wall, cpu = time.perf_counter(), time.process_time()
    stats = extract_wat(path, out, ExtractConfig())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"wall": wall, "cpu": cpu, "records": stats.extra["metadata_records"],
                      "img_links": stats.extra["img_links"], "kept": stats.counts.get("kept", 0),
                      "counts": dict(stats.counts)}))
    """
)

PEER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    core, path, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.sched_setaffinity(0, {core})
    from cc2dataset.main import extract_documents_from_wat
    with open(path, "rb") as stream:
        wall, cpu = time.perf_counter(), time.process_time()
        links = extract_documents_from_wat(stream, "image")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if mode == "time":
        print(json.dumps({"wall": wall, "cpu": cpu, "links_out": len(links)}))
    else:
        pairs = {}
        for link in links:
            alt = " ".join(link["alt"].split())
            if len(alt) >= 5 and link["url"].startswith(("http://", "https://")):
                pairs.setdefault((link["url"], alt), link["page_url"])
        print(json.dumps({"links_out": len(links), "pairs": [[u, a, p] for (u, a), p in sorted(pairs.items())]}))
    """
)

FLOOR_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    core, path, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.sched_setaffinity(0, {core})
    import orjson
    from laion_tasks.stages.extract import _fast_links
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    with open(path, "rb") as f:
        for r in ArchiveIterator(f, record_types=WarcRecordType.metadata, parse_http=False):
            body = r.reader.read(); n += 1
            if mode == "orjson" and b'"IMG@/src"' in body:
                orjson.loads(body)
            elif mode == "msgspec" and b'"IMG@/src"' in body:
                _fast_links(body)
    print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "records": n}))
    """
)


def ensure_peer_venv() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating the cc2dataset venv at {PEER_VENV} (pip install {PEER_SPEC})", flush=True)
        subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "-q", PEER_SPEC], check=True)
    return python


def replicate(source: Path, target: Path, min_bytes: int) -> int:
    data = source.read_bytes()
    copies = math.ceil(min_bytes / len(data))
    with open(target, "wb") as out:
        for _ in range(copies):
            out.write(data)
    return copies


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-mb", type=float, default=100.0)
    parser.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not SOURCE.exists():
        sys.exit(f"missing {SOURCE}: the benchmark needs ../shared/data")
    peer_python = ensure_peer_venv()
    env = {**os.environ, "LOGURU_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="extract-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        big = tmp / "replicated.warc.wat.gz"
        copies = replicate(SOURCE, big, int(args.min_mb * 1_000_000))
        size_mb = big.stat().st_size / 1e6
        print(f"input: {copies} copies of {SOURCE.name} = {size_mb:.1f} MB, core {args.core}", flush=True)

        def ours(path: Path) -> dict:
            return run_json([sys.executable, "-c", OURS_SCRIPT, str(args.core), str(path), str(tmp / "out.parquet")], env)

        def peer(path: Path, mode: str = "time") -> dict:
            return run_json([str(peer_python), "-c", PEER_SCRIPT, str(args.core), str(path), mode], env)

        floor = run_json([sys.executable, "-c", FLOOR_SCRIPT, str(args.core), str(big), "read"], env)
        floor_parse = run_json([sys.executable, "-c", FLOOR_SCRIPT, str(args.core), str(big), "orjson"], env)
        floor_fast = run_json([sys.executable, "-c", FLOOR_SCRIPT, str(args.core), str(big), "msgspec"], env)
        ours_runs, peer_runs = [], []
        for i in range(args.rounds):
            ours_runs.append(ours(big))
            peer_runs.append(peer(big))
            print(
                f"round {i + 1}: ours {ours_runs[-1]['wall']:.2f}s wall / {ours_runs[-1]['cpu']:.2f}s cpu, "
                f"cc2dataset {peer_runs[-1]['wall']:.2f}s wall / {peer_runs[-1]['cpu']:.2f}s cpu",
                flush=True,
            )

        # parity on the original file
        import pyarrow.parquet as pq

        parity_out = tmp / "parity.parquet"
        ours_parity = run_json([sys.executable, "-c", OURS_SCRIPT, str(args.core), str(SOURCE), str(parity_out)], env)
        rows = pq.read_table(parity_out).to_pylist()
        peer_parity = peer(SOURCE, "pairs")
    load_after = os.getloadavg()

    records = ours_runs[0]["records"]
    img_links = ours_runs[0]["img_links"]

    def summary(runs: list[dict], key: str) -> tuple[float, float]:
        values = [r[key] for r in runs]
        return min(values), statistics.median(values)

    o_wall, o_wall_med = summary(ours_runs, "wall")
    p_wall, p_wall_med = summary(peer_runs, "wall")
    o_cpu, _ = summary(ours_runs, "cpu")
    p_cpu, _ = summary(peer_runs, "cpu")
    ours_pairs = {(r["url"], r["alt"]) for r in rows}
    peer_pairs = {(u, a): p for u, a, p in peer_parity["pairs"]}
    peer_only = sorted(set(peer_pairs) - ours_pairs)
    ours_only = sorted(ours_pairs - set(peer_pairs))
    page_url_pairs = [pair for pair in peer_only if pair[0] == peer_pairs[pair]]
    unexplained = [pair for pair in peer_only if pair[0] != peer_pairs[pair]]

    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    lines = [
        "## Extract: WAT -> (url, alt) candidates, one core",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M')} with `.venv/bin/python bench/extract_bench.py` on a shared {os.cpu_count()}-core VM "
        f"({cpu_model}), CPU only; other processes were running (load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after), so wall times are noisy; both tools ran alternately, each in a fresh process "
        f"pinned to core {args.core}, {args.rounds} rounds each.",
        "",
        f"Input: {copies} concatenated copies of the real CC-MAIN-2016-40 WAT head "
        f"(`{SOURCE.name}`), {size_mb:.1f} MB gzip, {records:,} metadata records, {img_links:,} `IMG@/src` links.",
        "",
        "| | best wall s | median wall s | best CPU s | records/s (best wall) | IMG links/s (best wall) |",
        "|---|---|---|---|---|---|",
        f"| laion-tasks `extract_wat` (incl. Parquet write) | {o_wall:.2f} | {o_wall_med:.2f} | {o_cpu:.2f} | "
        f"{records / o_wall:,.0f} | {img_links / o_wall:,.0f} |",
        f"| cc2dataset 1.5.0 `extract_documents_from_wat` | {p_wall:.2f} | {p_wall_med:.2f} | {p_cpu:.2f} | "
        f"{records / p_wall:,.0f} | {img_links / p_wall:,.0f} |",
        f"| floor: fastwarc read + gunzip only | {floor['wall']:.2f} | | {floor['cpu']:.2f} | {floor['records'] / floor['wall']:,.0f} | |",
        f"| floor + orjson parse of the records holding `\"IMG@/src\"` | {floor_parse['wall']:.2f} | | {floor_parse['cpu']:.2f} | "
        f"{floor_parse['records'] / floor_parse['wall']:,.0f} | |",
        f"| floor + our msgspec typed decode of the same records (what `extract_wat` uses) | {floor_fast['wall']:.2f} | | "
        f"{floor_fast['cpu']:.2f} | {floor_fast['records'] / floor_fast['wall']:,.0f} | |",
        "",
        f"**Ratio (ours / cc2dataset): {p_wall / o_wall:.2f}x on best wall time, {p_wall_med / o_wall_med:.2f}x on median "
        f"wall time, {p_cpu / o_cpu:.2f}x on CPU time.** Target: >= 2x: "
        + ("met." if min(p_wall / o_wall, p_cpu / o_cpu) >= 2 else "NOT met in this run.")
        + f" Where the time goes (CPU): fastwarc read + gunzip {floor['cpu']:.2f} s; the typed decode of the records "
        f"that can hold an image link {floor_fast['cpu'] - floor['cpu']:.2f} s (orjson on the same records: "
        f"{floor_parse['cpu'] - floor['cpu']:.2f} s); everything else (locating IMG links among all links, whitespace "
        f"normalisation, URL resolution, filters, dedup, uid, Parquet) {o_cpu - floor_fast['cpu']:.2f} s. "
        "Tried and not kept: pysimdjson (its parse is the cheapest, but each of the ~2M link objects is reached through "
        "a Python proxy, which costs more than msgspec's whole decode); ISA-L gunzip feeding fastwarc an inflated stream "
        "(no gain end to end: its inflate alone is ~7% faster than fastwarc's, lost in the extra copy); a byte-level pre-filter of IMG link objects "
        "(Python loop per link, slower).",
        "",
        f"cc2dataset returns every IMG link with a non-empty alt ({peer_runs[0]['links_out']:,} links, "
        f"{peer_runs[0]['links_out'] / p_wall:,.0f} output links/s) and does not dedup; ours applies the filters and "
        f"dedups inside the file ({ours_runs[0]['kept']:,} kept), and writes the Parquet shard. "
        "Why ours is faster: a record's JSON is parsed only when its bytes contain `\"IMG@/src\"` "
        "(about 29% of the records here), and then by a typed msgspec decoder that materialises only the path to "
        "`Links` and each link's path/url/alt, skipping everything else (a record it rejects is re-parsed with orjson "
        "for the exact `bad:<reason>`); IMG links are located and their alt normalised with C-level list operations "
        "(`map(attrgetter)`, `list.index`, `map(str.split)`) instead of a Python test per link; and the three common "
        "relative URL forms (`//host/path`, `/path`, `path`) are joined without `urljoin` (same result, checked by "
        "tests on 40,000 random references). Timings exclude imports for both tools (ours: pyarrow's lazy pandas "
        "import, 0.2 s once per process, is done before timing, like cc2dataset's pyspark imports).",
        "",
        "Parity on the original file (500 records), both after: whitespace normalised, alt >= 5 characters, "
        "http(s) only, dedup of (url, alt):",
        "",
        f"- cc2dataset: {len(peer_pairs)} pairs; ours: {len(ours_pairs)} pairs; common: {len(ours_pairs & set(peer_pairs))}.",
        f"- Only in cc2dataset: {len(peer_only)}, of which {len(page_url_pairs)} have url == the page URL: they are "
        "`<img src=\"\">` (lazy-loaded images), which `urljoin(page, \"\")` turns into the page itself; the page is not "
        "an image, so we drop them as `drop:no_url`."
        + (f" {len(unexplained)} other(s): {unexplained[:5]}" if unexplained else ""),
        f"- Only in ours: {len(ours_only)}" + (f": {ours_only[:5]}" if ours_only else "."),
        f"- Our outcome counts on that file: {json.dumps(ours_parity['counts'], sort_keys=True)}.",
        "",
    ]
    text = "\n".join(lines)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
