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
http(s) only, deduplicated. Figures are recorded in ``bench/results/extract.json`` (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LAION_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCE = SHARED / "wat/cc-2016-40_head500/CC-MAIN-20160924173739-00000-ip-10-143-35-109.head500.warc.wat.gz"
PEER_VENV = Path(os.environ.get("CC2DATASET_VENV", REPO.parent / "peers" / "cc2dataset"))
PEER_SPEC = "cc2dataset==1.5.0"
RESULTS = REPO / "bench" / "results" / "extract.json"

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
    from laion_tasks.stages.extract.wat import _fast_links
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

    sys.path.insert(0, str(REPO / "bench"))
    from collect_results import machine_info, now, save_run

    setup = (
        f"Both tools ran alternately, each in a fresh process pinned to core {args.core}, {args.rounds} rounds each. "
        "Ours: `extract_wat` including the Parquet write; the peer: cc2dataset 1.5.0 `extract_documents_from_wat`. "
        "Floors: fastwarc read + gunzip alone, then plus a parse of the records holding `\"IMG@/src\"` (orjson, or our "
        "msgspec typed decode). Timings exclude imports for both tools (ours: pyarrow's lazy pandas import is done "
        "before timing, like cc2dataset's pyspark imports)."
    )
    floors = [("fastwarc read + gunzip only", floor), ("floor + orjson parse of the records holding `\"IMG@/src\"`",
                                                        floor_parse),
              ("floor + our msgspec typed decode of the same records (what `extract_wat` uses)", floor_fast)]
    run = {
        "date": now(), "command": ".venv/bin/python bench/extract_bench.py",
        "machine": machine_info(load_before[0], load_after[0]), "setup": setup,
        "settings": {"rounds": args.rounds, "core": args.core},
        "input": {"copies": copies, "file": SOURCE.name, "size_mb": size_mb, "records": records, "img_links": img_links},
        "ours": {"best_wall_s": o_wall, "median_wall_s": o_wall_med, "best_cpu_s": o_cpu, "records_per_s": records / o_wall,
                 "img_links_per_s": img_links / o_wall, "kept": ours_runs[0]["kept"], "rounds": ours_runs},
        "peer": {"name": "cc2dataset 1.5.0", "best_wall_s": p_wall, "median_wall_s": p_wall_med, "best_cpu_s": p_cpu,
                 "records_per_s": records / p_wall, "img_links_per_s": img_links / p_wall,
                 "links_out": peer_runs[0]["links_out"], "links_out_per_s": peer_runs[0]["links_out"] / p_wall,
                 "rounds": peer_runs},
        "ratio": {"best_wall": p_wall / o_wall, "median_wall": p_wall_med / o_wall_med, "cpu": p_cpu / o_cpu},
        "floors": [{"what": what, "wall_s": f["wall"], "cpu_s": f["cpu"], "records_per_s": f["records"] / f["wall"]}
                   for what, f in floors],
        "cpu_breakdown_s": {"read_gunzip": floor["cpu"], "typed_decode": floor_fast["cpu"] - floor["cpu"],
                            "orjson_decode": floor_parse["cpu"] - floor["cpu"], "rest": o_cpu - floor_fast["cpu"]},
        "parity": {"records": ours_parity["records"], "peer_pairs": len(peer_pairs), "ours_pairs": len(ours_pairs),
                   "common": len(ours_pairs & set(peer_pairs)), "peer_only": len(peer_only),
                   "peer_only_page_url": len(page_url_pairs), "peer_only_other": [list(x) for x in unexplained[:5]],
                   "ours_only": [list(x) for x in ours_only[:5]], "counts": ours_parity["counts"]},
    }
    save_run(args.results.stem, run, title="Extract: WAT -> (url, alt) candidates, one core",
             results_dir=args.results.parent)
    print(json.dumps({k: v for k, v in run.items() if k not in ("ours", "peer")}, indent=1))


if __name__ == "__main__":
    main()
