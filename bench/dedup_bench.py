"""Snapshot-scale dedup: rows/s, peak memory, and recall/precision of planted duplicates.

Synthetic CLIP-like fp16 512-d image embeddings (a shared direction plus one of many topic
directions plus noise, so random pairs sit near cosine 0.4 and same-topic pairs near 0.7, as
CLIP image embeddings do), written as download/clip shards with memory-mapped .npy files.
Planted duplicates, each of a distinct original:

* exact copies (``--exact`` of rows): same image bytes (sha256) and the same embedding, another URL;
* near copies (``--near`` of rows): another image (sha256) whose embedding has cosine in [0.972, 0.995].

Each size runs ours (laion_tasks.stages.dedup, all four steps) and, up to ``--peer-rows``, the
peer: this project's previous bucketed dedup (bench/peers/dedup_bucketed.py, 64 buckets, 2 probes),
whose per-bucket search is quadratic. Each run is a child process; its peak RSS is reported as the
kernel's high-water mark (VmHWM, which counts touched pages of memory-mapped files) and as the peak
of anonymous memory (RssAnon, sampled every 0.2 s), the part the memory budget bounds.

    .venv/bin/python bench/dedup_bench.py --rows 1000000 4000000 16000000

Data lives under --workdir (default /tmp) and is deleted after each size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DIM = 512
TOPICS = 10_000


# ---------------------------------------------------------------- data


def _sha(keys: np.ndarray) -> list[str]:
    """A stand-in image sha256 per original (copies reuse their original's)."""
    return [hashlib.sha256(k.encode()).hexdigest() for k in keys.tolist()]


def _base_vectors(rng: np.random.Generator, n: int, mu: np.ndarray, topics: np.ndarray) -> np.ndarray:
    topic = rng.integers(0, len(topics), n)
    noise = rng.standard_normal((n, DIM), dtype=np.float32) / np.sqrt(DIM)
    x = np.sqrt(0.4) * mu + np.sqrt(0.3) * topics[topic] + np.sqrt(0.3) * noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(root: Path, rows: int, shard_size: int, exact: float, near: float, seed: int) -> dict:
    """Write shards under root; return the planted pairs file and the shard inputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    mu = rng.standard_normal(DIM).astype(np.float32)
    mu /= np.linalg.norm(mu)
    topics = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    n_exact, n_near = int(rows * exact), int(rows * near)
    picked = rng.choice(rows, 2 * (n_exact + n_near), replace=False)
    copies, originals = picked[: n_exact + n_near], picked[n_exact + n_near :]
    kind = np.array(["exact"] * n_exact + ["near"] * n_near)
    n_shards = (rows + shard_size - 1) // shard_size
    (root / "in").mkdir(parents=True, exist_ok=True)

    def key(g: np.ndarray) -> np.ndarray:
        return np.char.add(np.char.zfill((g // shard_size).astype(str), 6), np.char.zfill((g % shard_size).astype(str), 5))

    shards = {}
    for s in range(n_shards):
        lo, hi = s * shard_size, min(rows, (s + 1) * shard_size)
        g = np.arange(lo, hi)
        shard = f"{s:06d}"
        emb = np.lib.format.open_memmap(root / "in" / f"{shard}.img.npy", mode="w+", dtype=np.float16, shape=(hi - lo, DIM))
        for a in range(0, hi - lo, 65536):
            b = min(hi - lo, a + 65536)
            emb[a:b] = _base_vectors(rng, b - a, mu, topics).astype(np.float16)
        emb.flush()
        del emb
        keys = key(g)
        urls = np.char.add("http://img.example/", keys)
        sim = rng.uniform(0.2, 0.45, hi - lo).astype(np.float32)
        pq.write_table(pa.table({
            "key": keys, "uid": np.char.add("u", keys), "url": urls, "caption": np.char.add("caption ", keys),
            "status": np.full(hi - lo, "success"), "sha256": _sha(keys),
        }), root / "in" / f"{shard}.parquet")
        pq.write_table(pa.table({
            "key": keys, "similarity": sim, "language_group": np.full(hi - lo, "en"), "has_embedding": np.ones(hi - lo, bool),
        }), root / "in" / f"{shard}.clip.parquet")
        shards[shard] = (str(root / "in" / f"{shard}.parquet"), str(root / "in" / f"{shard}.clip.parquet"),
                         str(root / "in" / f"{shard}.img.npy"))
    # plant: copy rows take their original's vector (exact) or a perturbed one (near); exact copies share the sha256
    orig_vec = np.empty((len(copies), DIM), dtype=np.float32)
    for s in np.unique(originals // shard_size):
        sel = np.flatnonzero(originals // shard_size == s)
        emb = np.load(root / "in" / f"{s:06d}.img.npy", mmap_mode="r")
        orig_vec[sel] = emb[originals[sel] % shard_size].astype(np.float32)
    cos = rng.uniform(0.972, 0.995, len(copies))
    noise = rng.standard_normal((len(copies), DIM)).astype(np.float32)
    noise -= (noise * orig_vec).sum(1, keepdims=True) * orig_vec  # orthogonal, so the cosine is exact
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    near_vec = orig_vec * cos[:, None] + noise * np.sqrt(1 - cos**2)[:, None]
    new_vec = np.where((kind == "exact")[:, None], orig_vec, near_vec).astype(np.float16)
    for s in np.unique(copies // shard_size):
        sel = np.flatnonzero(copies // shard_size == s)
        emb = np.load(root / "in" / f"{s:06d}.img.npy", mmap_mode="r+")
        emb[copies[sel] % shard_size] = new_vec[sel]
        emb.flush()
        del emb
        ex = sel[kind[sel] == "exact"]
        if ex.size:
            path = root / "in" / f"{s:06d}.parquet"
            table = pq.read_table(path)
            sha = np.array(table.column("sha256").to_pylist(), dtype=object)
            sha[copies[ex] % shard_size] = _sha(key(originals[ex]))
            table = table.set_column(table.column_names.index("sha256"), "sha256", pa.array(sha.tolist(), pa.string()))
            pq.write_table(table, path)
    pq.write_table(pa.table({"orig": key(originals), "copy": key(copies), "kind": kind}), root / "planted.parquet")
    return shards


# ---------------------------------------------------------------- child runs


class PeakAnon:
    """Samples RssAnon of this process (what memory-mapped files do not inflate)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kb("RssAnon"))
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_kb("RssAnon"))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    shards = json.loads((Path(args.data) / "shards.json").read_text())
    work, out = Path(args.data) / f"work-{args.child}", Path(args.data) / f"out-{args.child}"
    anon = PeakAnon()
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    if args.child == "ours":
        from laion_tasks.config import ClipConfig, DedupConfig
        from laion_tasks.stages import dedup as d

        config = DedupConfig(memory_limit=args.memory_limit, cluster_size=args.cluster_size,
                             near_dup_probes=args.probes, buckets=args.buckets)
        inputs = [d.ShardInput(k, *v) for k, v in sorted(shards.items())]
        t = time.perf_counter()
        d.dedup_centroids(inputs, d.centroids_uri(str(work)), config)
        steps["centroids"] = time.perf_counter() - t
        t = time.perf_counter()
        runs = d.make_runs([s.shard for s in inputs], max(1, len(inputs) * args.shard_size // 1_000_000))
        by_id = {s.shard: s for s in inputs}
        for run, ids in enumerate(runs):
            d.dedup_partition([by_id[s] for s in ids], run, str(work), config, ClipConfig(), d.centroids_uri(str(work)))
        steps["partition"] = time.perf_counter() - t
        t = time.perf_counter()
        for bucket in range(config.buckets):
            d.dedup_near(bucket, str(work), d.decision_uri(str(work), bucket), config)
        steps["near"] = time.perf_counter() - t
        t = time.perf_counter()
        d.dedup_resolve(str(work), str(out), config)
        steps["resolve"] = time.perf_counter() - t
    else:
        sys.path.insert(0, str(REPO / "bench" / "peers"))
        import dedup_bucketed as peer

        peer.dedup_all({k: tuple(v) for k, v in shards.items()}, str(work), str(out), peer.DedupConfig())
    seconds = time.perf_counter() - t0
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "steps": steps, "vmhwm_kb": _status_kb("VmHWM"), "anon_peak_kb": anon.stop()}))


def evaluate(data: Path, name: str) -> dict:
    """Recall: planted pairs whose two rows end with the same representative. Precision: removed
    rows whose representative is their planted partner."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET memory_limit='2GB'")
    con.execute(f"CREATE VIEW v AS SELECT key, coalesce(dup_of_key, key) AS rep, dup_of_key FROM read_parquet('{data}/out-{name}/*.parquet')")
    con.execute(f"CREATE VIEW p AS SELECT * FROM read_parquet('{data}/planted.parquet')")
    recall = dict(con.execute(
        "SELECT p.kind, avg((a.rep = b.rep)::INT) FROM p JOIN v a ON a.key = p.orig JOIN v b ON b.key = p.copy GROUP BY p.kind"
    ).fetchall())
    removed, correct = con.execute(
        "SELECT count(*), count(p.kind) + count(q.kind) FROM v LEFT JOIN p ON p.copy = v.key AND p.orig = v.dup_of_key "
        "LEFT JOIN p AS q ON q.orig = v.key AND q.copy = v.dup_of_key WHERE v.dup_of_key IS NOT NULL"
    ).fetchone()
    rows = con.execute("SELECT count(*) FROM v").fetchone()[0]
    planted = con.execute("SELECT count(*) FROM p").fetchone()[0]
    return {"rows_out": rows, "removed": removed, "planted_pairs": planted,
            "recall_exact": recall.get("exact"), "recall_near": recall.get("near"),
            "recall": (sum(recall.values()) / len(recall)) if recall else None,
            "precision": correct / removed if removed else None}


def run_child(name: str, data: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--data", str(data), "--memory-limit", args.memory_limit,
           "--cluster-size", str(args.cluster_size), "--probes", str(args.probes), "--buckets", str(args.buckets),
           "--shard-size", str(args.shard_size)]
    # one thread per run: the 2 cores are shared, and OpenMP spin-waits collapse under contention
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(evaluate(data, name))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    ap.add_argument("--peer-rows", type=int, default=1_000_000, help="run the quadratic peer only up to this size")
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--exact", type=float, default=0.01)
    ap.add_argument("--near", type=float, default=0.01)
    ap.add_argument("--memory-limit", default="4GB", help="dedup.memory_limit (the budget checked against peak RSS)")
    ap.add_argument("--cluster-size", type=int, default=1000)
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--buckets", type=int, default=64)
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--timeout", type=int, default=4 * 3600)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dedup.json"),
                    help="the JSON record (bench/README.md); give sizes run in parallel their own and --merge them")
    ap.add_argument("--reuse", action="store_true", help="reuse data already generated under --workdir")
    ap.add_argument("--merge", nargs="+", help="only merge the sizes of these JSON records (sizes run in parallel) into --out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.merge:
        merged = [r for path in args.merge for r in _recorded_results(Path(path))]
        first = json.loads(Path(args.merge[0]).read_text())
        # the merged sizes were measured where and when their invocations ran, not where they are merged
        meta = {k: first["runs"][-1][k] for k in ("date", "machine")} if isinstance(first, dict) else {}
        record(sorted(merged, key=lambda r: r["rows"]), args, load_before=None, meta=meta)
        return
    results = []
    load_before = os.getloadavg()[0]
    for rows in args.rows:
        data = Path(args.workdir) / f"laion-dedup-bench-{rows}"
        if not (args.reuse and (data / "shards.json").exists()):
            shutil.rmtree(data, ignore_errors=True)
        try:
            for old in ("work-ours", "out-ours", "work-peer", "out-peer"):
                shutil.rmtree(data / old, ignore_errors=True)
            if not (data / "shards.json").exists():
                t = time.perf_counter()
                shards = generate(data, rows, args.shard_size, args.exact, args.near, seed=rows)
                (data / "shards.json").write_text(json.dumps(shards))
                print(f"{rows} rows generated in {time.perf_counter() - t:.0f} s", flush=True)
            entry = {"rows": rows, "ours": run_child("ours", data, args)}
            print(json.dumps(entry), flush=True)
            if rows <= args.peer_rows:
                entry["peer"] = run_child("peer", data, args)
                print(json.dumps(entry["peer"]), flush=True)
            results.append(entry)
        finally:
            shutil.rmtree(data, ignore_errors=True)
        record(results, args, load_before)  # after each size, so a long run leaves its finished sizes


def _recorded_results(path: Path) -> list[dict]:
    """The per-size results of a JSON record (or of an older plain list of them)."""
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else [r for run in data["runs"][-1:] for r in run["results"]]


def record(results: list[dict], args: argparse.Namespace, load_before: float | None, meta: dict | None = None) -> None:
    """Write the run to the JSON record (bench/README.md); collect_results.py renders RESULTS.md from it."""
    sys.path.insert(0, str(REPO / "bench"))
    from collect_results import machine_info, now, save_run

    out = Path(args.out)
    settings = {"dim": DIM, "shard_size": args.shard_size, "exact": args.exact, "near": args.near,
                "near_cosine": [0.972, 0.995], "cluster_size": args.cluster_size, "probes": args.probes,
                "buckets": args.buckets, "memory_limit": args.memory_limit, "threshold": 0.95,
                "ground_truth": "planted", "peer_rows": args.peer_rows,
                "peer": "the previous bucketed dedup (bench/peers/dedup_bucketed.py, 64 buckets, 2 probes)"}
    setup = (f"Synthetic CLIP-like fp16 {DIM}-d embeddings, {args.shard_size:,} rows per shard; planted "
             f"{args.exact:.0%} exact copies (same sha256 and embedding) and {args.near:.0%} near copies (cosine "
             f"0.972-0.995). Ours: `cluster_size={args.cluster_size}`, `near_dup_probes={args.probes}`, "
             f"`buckets={args.buckets}`, `memory_limit={args.memory_limit}`, threshold 0.95. Peer: the previous "
             "bucketed dedup (64 buckets, 2 probes). Each run is one process with one thread (OMP_NUM_THREADS=1): "
             "rates are per core.")
    save_run(out.stem, {"date": now(), "command": " ".join([".venv/bin/python bench/dedup_bench.py", *sys.argv[1:]]),
                        "machine": machine_info(load_before), "setup": setup, "settings": settings,
                        "results": results, **(meta or {})},
             title="Snapshot-scale dedup (`bench/dedup_bench.py`)", results_dir=out.parent)
    print(f"recorded in {out}")


if __name__ == "__main__":
    main()
