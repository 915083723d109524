"""Curation of LAION's seven default subsets on a generated snapshot with dedup verdicts: one scan vs one scan per subset.

    .venv/bin/python bench/curate_bench.py [--rows 2000000 16000000] [--per-subset-rows 2000000] [--memory-limit 2GB]

The snapshot: generated download / clip / tags Parquet (50,000 rows per shard) with planted exact copies
(``--url-alt-copies`` of the rows repeat an earlier row's url and alt, ``--sha-copies`` its image sha256),
then **dedup's own output for it**, as a real curate run reads it: ``dedup_partition`` (exact digests and ranks,
no near-dup search) and ``dedup_resolve`` over the generated shards, with synthetic near-duplicate decisions
(``--near-pairs`` of the rows paired with another eligible row) standing in for the near step. That writes
``dedup/<shard>.parquet`` (one verdict per row, with the ranks and digests curate resolves each subset with)
and ``dedup_work/pairs.parquet``; so the curation timed below pays the dedup join and the per-subset dedup
like a real run. Generating the verdicts is timed apart and not counted.

``one_scan``: ``curate_snapshot`` writes every subset from one scan of the snapshot (one ``curate_subsets``
task in the DAG). ``scan_per_subset``: the same code called once per subset, each call opening the snapshot
and scanning it for its own subset, which is what the DAG did before (run up to ``--per-subset-rows``). There
is no external peer: LAION cut its subsets with ad-hoc Spark/pandas scripts. Each run is a child process with
one DuckDB thread; CPU time is user + system of that process; peak RSS is VmHWM and the sampled peak of
anonymous memory, against the DuckDB memory limit. The run is recorded in bench/results/curate.json
(bench/README.md), from which bench/collect_results.py renders RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
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

SNAPSHOT = "S"
IMPLS = ("one_scan", "scan_per_subset")


def _source_rows(rng: np.random.Generator, start: int, n: int, frac: float) -> np.ndarray:
    """For rows start..start+n: the global index each one copies (an earlier row), or itself."""
    ids = np.arange(start, start + n)
    copy = (rng.random(n) < frac) & (ids > 0)
    return np.where(copy, (rng.random(n) * np.maximum(ids, 1)).astype(np.int64), ids)


def _url_alt(src: np.ndarray, per_shard: int) -> tuple[np.ndarray, np.ndarray]:
    s, i = (src // per_shard).astype(str), (src % per_shard).astype(str)
    host = (src // per_shard % 1000).astype(str)
    url = np.char.add(np.char.add(np.char.add(np.char.add(np.char.add("http://h", host), ".example/"), s), "/"), i)
    alt = np.char.add(np.char.add(np.char.add("a caption about a thing in shard ", s), ", number "), i)
    return np.char.add(url, ".jpg"), alt


def _sha256_like(src: np.ndarray) -> np.ndarray:
    """A 64-hex-digit stand-in image sha256 per source row, distinct in the leading 32 digits dedup reads."""
    mixed = (src.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2**64: a bijection
    digits = np.char.zfill(np.char.mod("%x", mixed), 16)
    return np.char.add(np.char.add(digits, digits), np.char.add(digits, digits))


def generate(root: str, rows: int, per_shard: int, url_alt_copies: float, sha_copies: float) -> None:
    """download / clip / tags Parquet for ``rows`` samples (vectorised: strings via numpy), with planted copies."""
    rng = np.random.default_rng(0)
    for s in range((rows + per_shard - 1) // per_shard):
        start, n = s * per_shard, min(per_shard, rows - s * per_shard)
        shard = layout.shard_name(s)
        i = np.arange(n).astype(str)
        keys = np.char.add(f"{s:05d}", np.char.zfill(i, 5))
        ua_src = _source_rows(rng, start, n, url_alt_copies)
        sha_src = np.where(rng.random(n) < sha_copies, _source_rows(rng, start, n, 1.0), ua_src)
        url, alt = _url_alt(ua_src, per_shard)
        uids = np.char.add("u", ua_src.astype(str))  # exact (url, alt) copies share the uid, as extract makes them
        ok = rng.random(n) < 0.8
        sim = rng.uniform(0.1, 0.45, n).astype("float32")
        lang = rng.choice(np.array(["en", "de", "fr", None], dtype=object), n)
        group = np.where(lang == "en", "en", np.where(lang == None, "nolang", "multi"))  # noqa: E711
        images = pa.table({
            "key": keys, "uid": uids, "url": url, "caption": alt,
            "status": np.where(ok, "success", "http_404"),
            "original_width": rng.choice([300, 640, 1024, 2000], n),
            "original_height": rng.choice([200, 480, 1024, 1500], n),
            "original_bytes": rng.integers(1000, 500_000, n),
            "sha256": _sha256_like(sha_src),
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
            (images, layout.images_parquet_uri(root, SNAPSHOT, shard)),
            (clip, layout.clip_parquet_uri(root, SNAPSHOT, shard)),
            (tags, layout.tags_parquet_uri(root, SNAPSHOT, shard)),
        ):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, uri)


def dedup_verdicts(root: str, near_pairs: float, memory_limit: str) -> dict:
    """Dedup's output for the generated snapshot, written by dedup's own steps (see the module doc)."""
    from laion_tasks.config import ClipConfig, DedupConfig
    from laion_tasks.stages import dedup as d

    start, cpu = time.perf_counter(), time.process_time()
    config = DedupConfig(near_dup=False, memory_limit=memory_limit)
    work = d.work_dir_for(root, SNAPSHOT)
    shards = sorted(p.stem for p in Path(layout.images_parquet_uri(root, SNAPSHOT, "x")).parent.glob("*.parquet"))
    inputs = {s: d.ShardInput(s, layout.images_parquet_uri(root, SNAPSHOT, s), layout.clip_parquet_uri(root, SNAPSHOT, s),
                              None, layout.tags_parquet_uri(root, SNAPSHOT, s)) for s in shards}
    runs = d.make_runs(shards, 16)
    for run, ids in enumerate(runs):
        d.dedup_partition([inputs[s] for s in ids], run, work, config, ClipConfig())
    # The near step's decisions: pairs of eligible rows (rank, dup), dup the smaller rank, as dedup_near writes them.
    rng = np.random.default_rng(1)
    pairs = []
    for prefix in d.list_runs(work):
        rank = pq.read_table(f"{prefix}.rows.parquet", columns=["rank"]).column("rank").to_numpy()
        eligible = rank[(rank >> d.INELIGIBLE_BIT) & 1 == 0]
        k = int(len(rank) * near_pairs)
        if len(eligible) > 1 and k:
            a, b = rng.choice(eligible, k), rng.choice(eligible, k)
            keep = a != b
            pairs.append(np.stack([np.maximum(a, b)[keep], np.minimum(a, b)[keep]], axis=1))
    edges = np.concatenate(pairs) if pairs else np.empty((0, 2), np.int64)
    decision = Path(d.decision_uri(work, 0))
    decision.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"rank": edges[:, 0], "dup": edges[:, 1]}, schema=d.DECISION_SCHEMA), decision)
    stats = d.dedup_resolve(work, layout.dedup_dir(root, SNAPSHOT), config)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "near_pairs": int(len(edges)), "removed": sum(v for k, v in stats.counts.items() if k.startswith("drop:")),
            "by_reason": {k: int(v) for k, v in stats.counts.items() if k.startswith("drop:")}}


def child(args: argparse.Namespace) -> None:
    import resource

    from dedup_bench import PeakAnon, _status_kb

    from laion_tasks.config import CurateConfig
    from laion_tasks.snapshot_db import open_snapshot
    from laion_tasks.stages.curate import curate_snapshot, curate_subsets

    config = CurateConfig(duckdb_memory_limit=args.memory_limit, duckdb_threads=1)
    anon = PeakAnon()
    start = time.perf_counter()
    if args.child == "one_scan":
        results = curate_snapshot(args.root, SNAPSHOT, config)
    else:  # what the DAG did before: one task per subset, each with its own snapshot view and scan
        results = {}
        for name, subset in config.subsets.items():
            with open_snapshot(args.root, SNAPSHOT, config) as db:
                results.update(curate_subsets(db, {name: subset}, config))
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "vmhwm_kb": _status_kb("VmHWM"), "anon_peak_kb": anon.stop(),
        "scans": 1 if args.child == "one_scan" else len(results),
        "rows": {n: r.extra["rows"] for n, r in results.items()},
        "duplicates": {n: int(r.counts.get("drop:duplicate", 0)) for n, r in results.items()},
        "status": {n: r.extra["status"] for n, r in results.items()},
    }))


def run_child(name: str, root: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--root", root, "--memory-limit", args.memory_limit]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode:
        raise RuntimeError(f"curate_bench {name} on {root} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def record(results: list[dict], args: argparse.Namespace, load_before: float) -> None:
    """Record the run in bench/results/curate.json (replacing the latest run; labelled earlier runs stay)."""
    from collect_results import machine_info, now, save_run

    setup = (
        f"Generated download/clip/tags Parquet ({args.per_shard:,} rows per shard) with planted exact copies "
        f"({args.url_alt_copies:.0%} of the rows repeat an earlier row's url and alt, {args.sha_copies:.0%} its "
        "image sha256), and dedup's own output for it as a real curate run reads it: `dedup_partition` and "
        f"`dedup_resolve` over the generated shards, with synthetic near-duplicate decisions for {args.near_pairs:.0%} "
        "of the rows standing in for the near step, write `dedup/<shard>.parquet` and `dedup_work/pairs.parquet`; "
        "curation joins those verdicts and dedups within each subset (generating them is not timed). LAION's seven "
        f"default subsets, all available (aesthetic scores generated); DuckDB `memory_limit={args.memory_limit}`, "
        "one thread. `one_scan`: `curate_snapshot` writes every subset from one scan. `scan_per_subset`: the same "
        "code called once per subset, each call opening and scanning the snapshot (the previous DAG's way); no "
        "external peer exists."
    )
    save_run("curate", {
        "date": now(), "command": " ".join([".venv/bin/python bench/curate_bench.py", *sys.argv[1:]]),
        "machine": machine_info(load_before), "setup": setup,
        "settings": {"per_shard": args.per_shard, "memory_limit": args.memory_limit, "threads": 1,
                     "dedup_verdicts": True, "url_alt_copies": args.url_alt_copies, "sha_copies": args.sha_copies,
                     "near_pairs": args.near_pairs, "per_subset_rows": args.per_subset_rows},
        "results": results,
    }, title="Curation of the seven default subsets (`bench/curate_bench.py`)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 16_000_000])
    parser.add_argument("--per-subset-rows", type=int, default=2_000_000,
                        help="run the one-scan-per-subset curation only up to this size")
    parser.add_argument("--per-shard", type=int, default=50_000)
    parser.add_argument("--url-alt-copies", type=float, default=0.03, help="share of rows repeating a url and alt")
    parser.add_argument("--sha-copies", type=float, default=0.03, help="share of rows repeating an image sha256")
    parser.add_argument("--near-pairs", type=float, default=0.02, help="near-duplicate pairs per row")
    parser.add_argument("--memory-limit", default="2GB", help="curate.duckdb_memory_limit (and dedup's, for the verdicts)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--timeout", type=int, default=4 * 3600)
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = []
    load_before = os.getloadavg()[0]
    for rows in args.rows:
        root = tempfile.mkdtemp(prefix="curate-bench-", dir=args.workdir)
        try:
            t = time.perf_counter()
            generate(root, rows, args.per_shard, args.url_alt_copies, args.sha_copies)
            print(f"{rows:,} rows generated in {time.perf_counter() - t:.0f} s", flush=True)
            entry: dict = {"rows": rows, "dedup": dedup_verdicts(root, args.near_pairs, args.memory_limit)}
            print(f"dedup verdicts: {json.dumps(entry['dedup'])}", flush=True)
            entry["one_scan"] = run_child("one_scan", root, args)
            print(json.dumps(entry["one_scan"]), flush=True)
            if rows <= args.per_subset_rows:
                entry["scan_per_subset"] = run_child("scan_per_subset", root, args)
                print(json.dumps(entry["scan_per_subset"]), flush=True)
                if entry["scan_per_subset"]["rows"] != entry["one_scan"]["rows"]:
                    raise RuntimeError(f"{rows:,} rows: one scan and one scan per subset wrote different subsets: "
                                       f"{entry['one_scan']['rows']} vs {entry['scan_per_subset']['rows']}")
            results.append(entry)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        record(results, args, load_before)  # after each size, so a long run leaves its finished sizes
    print("recorded in bench/results/curate.json")


if __name__ == "__main__":
    main()
