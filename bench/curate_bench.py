"""Curation of LAION's seven default subsets on a generated snapshot: one scan vs one scan per subset.

    .venv/bin/python bench/curate_bench.py [--rows 16000000] [--peer-rows 2000000] [--memory-limit 2GB]

Ours: ``curate_snapshot`` writes every subset from one scan of the snapshot (one ``curate_subsets``
task in the DAG). Peer: what the DAG did before, one task per subset, each opening the snapshot and
scanning it for its own count and write (run up to ``--peer-rows``). Each run is a child process; peak
RSS is VmHWM and the sampled peak of anonymous memory, against the DuckDB memory limit. Then the
dataset card is timed once. No external peer: LAION cut its subsets with ad-hoc Spark/pandas scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from laion_tasks import layout  # noqa: E402


def generate(root: str, snapshot: str, rows: int, per_shard: int = 50_000) -> None:
    """download / clip / tags Parquet for ``rows`` samples (vectorised: strings via numpy)."""
    rng = np.random.default_rng(0)
    for s in range((rows + per_shard - 1) // per_shard):
        n = min(per_shard, rows - s * per_shard)
        shard = layout.shard_name(s)
        i = np.arange(n).astype(str)
        keys = np.char.add(f"{s:05d}", np.char.zfill(i, 5))
        uids = np.char.add(f"u{s}-", i)
        ok = rng.random(n) < 0.8
        sim = rng.uniform(0.1, 0.45, n).astype("float32")
        lang = rng.choice(np.array(["en", "de", "fr", None], dtype=object), n)
        group = np.where(lang == "en", "en", np.where(lang == None, "nolang", "multi"))  # noqa: E711
        images = pa.table({
            "key": keys, "uid": uids,
            "url": np.char.add(np.char.add(f"http://h{s % 1000}.example/{s}/", i), ".jpg"),
            "caption": np.char.add(f"a caption about a thing in shard {s}, number ", i),
            "status": np.where(ok, "success", "http_404"),
            "original_width": rng.choice([300, 640, 1024, 2000], n),
            "original_height": rng.choice([200, 480, 1024, 1500], n),
            "original_bytes": rng.integers(1000, 500_000, n),
            "sha256": np.char.zfill(np.char.add(f"{s:x}", i), 64),
        })  # fmt: skip
        clip = pa.table({
            "key": keys, "uid": uids, "similarity": pa.array(sim, mask=~ok),
            "clip_status": np.where(ok, "scored", "no_image"), "language": lang, "language_group": group,
        })  # fmt: skip
        tags = pa.table({
            "key": keys, "uid": uids, "language": lang, "language_group": group,
            "punsafe": rng.random(n).astype("float32"), "pwatermark": rng.random(n).astype("float32"),
            "aesthetic_score": rng.uniform(3, 8, n).astype("float32"),
            "hashlist_blocked": rng.random(n) < 0.01,
        })  # fmt: skip
        for table, uri in (
            (images, layout.images_parquet_uri(root, snapshot, shard)),
            (clip, layout.clip_parquet_uri(root, snapshot, shard)),
            (tags, layout.tags_parquet_uri(root, snapshot, shard)),
        ):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, uri)


def child(args: argparse.Namespace) -> None:
    import resource

    from dedup_bench import PeakAnon, _status_kb

    from laion_tasks.config import CurateConfig
    from laion_tasks.snapshot_db import open_snapshot
    from laion_tasks.stages.curate import curate_snapshot, curate_subsets

    config = CurateConfig(duckdb_memory_limit=args.memory_limit, duckdb_threads=1)
    anon = PeakAnon()
    start = time.perf_counter()
    if args.child == "ours":
        results = curate_snapshot(args.root, "S", config)
    else:  # the previous DAG: one task per subset, each with its own snapshot view and scan
        results = {}
        for name, subset in config.subsets.items():
            with open_snapshot(args.root, "S", config) as db:
                results.update(curate_subsets(db, {name: subset}, config))
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "vmhwm_kb": _status_kb("VmHWM"), "anon_peak_kb": anon.stop(),
        "rows": {n: r.extra["rows"] for n, r in results.items()},
        "status": {n: r.extra["status"] for n, r in results.items()},
    }))


def run_child(name: str, root: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--root", root, "--memory-limit", args.memory_limit]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 16_000_000])
    parser.add_argument("--peer-rows", type=int, default=2_000_000, help="run the per-subset peer only up to this size")
    parser.add_argument("--memory-limit", default="2GB", help="curate.duckdb_memory_limit")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--timeout", type=int, default=4 * 3600)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "curate.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = []
    for rows in args.rows:
        root = tempfile.mkdtemp(prefix="curate-bench-", dir=args.workdir)
        try:
            t = time.perf_counter()
            generate(root, "S", rows)
            print(f"{rows:,} rows generated in {time.perf_counter() - t:.0f} s", flush=True)
            entry = {"rows": rows, "ours": run_child("ours", root, args)}
            print(json.dumps(entry), flush=True)
            if rows <= args.peer_rows:
                entry["peer"] = run_child("peer", root, args)
                print(json.dumps(entry["peer"]), flush=True)
                assert entry["peer"]["rows"] == entry["ours"]["rows"], "one scan and per-subset scans disagree"
            results.append(entry)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
        write_markdown(results, args)  # after each size, so a long run leaves its finished sizes


def write_markdown(results: list[dict], args: argparse.Namespace) -> None:
    lines = [
        "## Curation of the seven default subsets (`bench/curate_bench.py`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, CPU only, shared with other jobs. "
        f"Generated download/clip/tags Parquet (50,000 rows per shard); LAION's seven default subsets, all available "
        f"(aesthetic scores generated); DuckDB `memory_limit={args.memory_limit}`, one thread. Ours: one scan for all "
        "subsets. Peer: the previous DAG's way, one task per subset, each opening and scanning the snapshot. "
        "Rates are per CPU-second (user + system of the child process), which the shared machine's load does not change.",
        "",
        "| rows | impl | snapshot scans | wall s | CPU s | rows per CPU-s (all subsets) | peak RSS anon / VmHWM (GiB) | rows written (sum over subsets) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for name, scans in (("ours", 1), ("peer", 7)):
            if name not in r:
                continue
            m = r[name]
            lines.append(
                f"| {r['rows']:,} | {name} | {scans} | {m['seconds']:.0f} | {m['cpu_seconds']:.0f} | "
                f"{r['rows'] / m['cpu_seconds']:,.0f} | {m['anon_peak_kb'] / 2**20:.2f} / {m['vmhwm_kb'] / 2**20:.2f} | "
                f"{sum(m['rows'].values()):,} |"
            )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
