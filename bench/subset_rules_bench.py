"""Subset rules at snapshot scale: the CLIP-score percentile (exact vs sketches) and the image-cluster rule.

Generated clip shards (``--per-shard`` rows each: ``key``, ``similarity`` float32, ``has_embedding``; and
fp16 512-d image embeddings shaped like CLIP's, a shared direction plus one of many topics plus noise,
drawn from a base of 2^18 such vectors).
Every step runs in a child process that reports its own CPU time (user + system, all threads: the
machine is shared, so process time, not wall time, is the figure) and peak memory: the kernel's
high-water mark (VmHWM, which counts touched pages of memory-mapped files) and the peak of anonymous
memory (RssAnon, sampled every 0.1 s), the part a memory budget bounds.

Percentile threshold, ``clip_score_top_pct: 30`` over every scored row:

* ``exact``: what curate runs (:func:`laion_tasks.stages.subset_rules.score_threshold`): DuckDB's
  ``quantile_disc`` over the ``clip`` view of the snapshot (``curate.duckdb_memory_limit`` 2GB);
* ``sketch``: a KLL sketch per shard (Apache DataSketches ``kll_floats_sketch``, k = 200, in its own venv,
  ``/work/peers/datasketches``), written as a file per shard (the map tasks), then one task that merges them
  and reads the quantile (the reduce); its threshold's rank error is checked against the exact one.

Image-cluster rule, clusters of ``cluster_size`` (1000) embeddings:

* ``train``: the rule's own centroids (dedup's two-level k-means on a sample), when dedup's sizes do not fit;
* ``assign``: every pool embedding through the centroid tree (:class:`~laion_tasks.stages.subset_rules.OwnPool`);
* ``members``: with dedup's clusters reused, the ranks in the hit clusters from dedup's per-run
  ``primary``/``rank`` arrays (written here as dedup writes them, from the ``assign`` step's clusters);
* ``narrow``: the flag update over curate's scan table (one row per sample) by those ranks.

    .venv/bin/python bench/subset_rules_bench.py --rows 16000000

Data lives under --workdir (default /tmp) and is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DIM = 512
TOPICS = 10_000
BASE = 1 << 18
"""Distinct embeddings the rows are drawn from."""
SNAP = "BENCH"
TOP_PCT = 30.0
SKETCH_VENV = Path("/work/peers/datasketches")
SKETCH_K = 200


# ---------------------------------------------------------------- measuring a step (in the child)


class Peak:
    """Samples RssAnon every 0.1 s until stopped; VmHWM is read at the end."""

    def __init__(self) -> None:
        self.anon_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.anon_kb = max(self.anon_kb, self.status("RssAnon"))
            time.sleep(0.1)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.anon_kb = max(self.anon_kb, self.status("RssAnon"))
        return {"vmhwm_kb": self.status("VmHWM"), "anon_peak_kb": self.anon_kb}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measured(fn, *args) -> dict:  # type: ignore[no-untyped-def]
    """Run ``fn`` and return its result with the CPU seconds and peaks it took (beyond the imports)."""
    base_cpu, base_anon = cpu_seconds(), Peak.status("RssAnon")
    peak = Peak()
    wall = time.perf_counter()
    result = fn(*args)
    out = {"seconds": time.perf_counter() - wall, "cpu_seconds": cpu_seconds() - base_cpu, **peak.stop(),
           "anon_at_start_kb": base_anon}
    out.update(result or {})
    return out


# ---------------------------------------------------------------- data


def generate(root: Path, rows: int, per_shard: int, seed: int, embedded_rows: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    mu = rng.standard_normal(DIM).astype(np.float32)
    mu /= np.linalg.norm(mu)
    topics = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    clip = root / SNAP / "clip"
    clip.mkdir(parents=True, exist_ok=True)
    # a base of BASE distinct vectors, drawn per row (the cost of assigning a row does not depend on
    # whether another row has the same vector, and drawing 16M x 512 normals takes long on a shared box)
    base = np.empty((BASE, DIM), dtype=np.float16)
    for a in range(0, BASE, 65_536):
        b = min(BASE, a + 65_536)
        noise = rng.standard_normal((b - a, DIM), dtype=np.float32) / np.sqrt(DIM)
        x = np.sqrt(0.4) * mu + np.sqrt(0.3) * topics[rng.integers(0, TOPICS, b - a)] + np.sqrt(0.3) * noise
        base[a:b] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    shards = []
    for s in range(0, rows, per_shard):
        n = min(per_shard, rows - s)
        shard = f"{s // per_shard:06d}"
        if s < embedded_rows:  # the image rule's pool: the first embedded_rows rows
            emb = np.lib.format.open_memmap(clip / f"{shard}.img.npy", mode="w+", dtype=np.float16, shape=(n, DIM))
            for a in range(0, n, 65_536):
                b = min(n, a + 65_536)
                emb[a:b] = base[rng.integers(0, BASE, b - a)]
            emb.flush()
            del emb
        keys = np.char.add(shard, np.char.zfill(np.arange(n).astype(str), 6))
        pq.write_table(pa.table({"key": keys, "similarity": rng.normal(0.3, 0.05, n).astype(np.float32),
                                 "clip_model": np.full(n, "ViT-B-32"), "has_embedding": np.ones(n, bool)}),
                       clip / f"{shard}.parquet")
        shards.append(shard)
    return shards


# ---------------------------------------------------------------- the steps (children)


def _db(root: Path):  # type: ignore[no-untyped-def]
    """The ``clip`` view of curate's SnapshotDB, over the generated shards (curate's DuckDB settings)."""
    import tempfile

    from laion_tasks.config import CurateConfig
    from laion_tasks.snapshot_db import SnapshotDB, _table_select, connect_duckdb

    work = Path(tempfile.mkdtemp(prefix="rules-bench-", dir=root))
    con = connect_duckdb(CurateConfig(), work)
    select, _ = _table_select(con, "clip", str(root / SNAP / "clip" / "*.parquet"))
    con.execute(f"CREATE VIEW clip AS {select}").fetchall()
    return SnapshotDB(root=str(root), snapshot=SNAP, con=con, files={}, view_sql="", work_dir=work)


def step_exact(root: Path) -> dict:
    from laion_tasks.stages.subset_rules import score_threshold

    def run() -> dict:
        t = score_threshold(_db(root), TOP_PCT)
        return {"threshold": t.threshold, "population": t.population}

    return measured(run)


def step_sketch_map(root: Path, out: Path) -> dict:
    """One KLL sketch per shard, each written to a file (what a per-shard map task would do)."""
    import pyarrow.parquet as pq
    from datasketches import kll_floats_sketch

    out.mkdir(parents=True, exist_ok=True)

    def run() -> dict:
        n = 0
        for path in sorted((root / SNAP / "clip").glob("*.parquet")):
            sim = np.array(pq.read_table(path, columns=["similarity"]).column(0).to_numpy(), dtype=np.float32)
            sketch = kll_floats_sketch(SKETCH_K)
            sketch.update(sim)
            (out / f"{path.stem}.kll").write_bytes(sketch.serialize())
            n += len(sim)
        return {"rows": n, "sketch_bytes": sum(p.stat().st_size for p in out.glob("*.kll"))}

    return measured(run)


def step_sketch_reduce(out: Path) -> dict:
    from datasketches import kll_floats_sketch

    def run() -> dict:
        merged = kll_floats_sketch(SKETCH_K)
        for path in sorted(out.glob("*.kll")):
            merged.merge(kll_floats_sketch.deserialize(path.read_bytes()))
        return {"threshold": float(merged.get_quantile(1 - TOP_PCT / 100)), "normalized_rank_error": merged.normalized_rank_error(False)}

    return measured(run)


def step_train(root: Path, cluster_size: int) -> dict:
    from laion_tasks.config import DedupConfig
    from laion_tasks.stages.dedup import ShardInput, dedup_centroids
    from laion_tasks.stages.subset_rules import pool_shards

    def run() -> dict:
        db = _db(root)
        shards = pool_shards(db)
        stats = dedup_centroids([ShardInput(s, "", c, e) for s, c, e in shards], str(root / "centroids.npz"),
                                DedupConfig(cluster_size=cluster_size, near_dup_probes=1, memory_limit="1GB"))
        return {"clusters": stats.extra["clusters"], "sample_rows": stats.extra["sample_rows"]}

    return measured(run)


def step_assign(root: Path, rows: int) -> dict:
    """Every pool embedding's cluster through the rule's tree; writes dedup-style runs of ``rows`` vectors for
    ``members`` (the assigned clusters, repeated when the pool is smaller than ``rows``)."""
    from laion_tasks.stages.dedup import Centroids
    from laion_tasks.stages.subset_rules import OwnPool, pool_shards

    def run() -> dict:
        pool = OwnPool(Centroids.load(str(root / "centroids.npz")), pool_shards(_db(root)))
        return {"rows": pool.vectors, "_assigned": pool.assigned}

    result = measured(run)
    pool = np.concatenate(result.pop("_assigned"))
    assigned = np.array_split(np.resize(pool, rows), max(1, rows // 1_000_000))
    runs = root / "runs"
    runs.mkdir(exist_ok=True)
    offset = 0
    for r, primary in enumerate(assigned):  # a run of about a million vectors each
        rank = np.arange(offset, offset + len(primary), dtype=np.int64)
        offset += len(primary)
        order = np.argsort(primary, kind="stable")
        np.save(runs / f"run-{r:05d}.primary.npy", primary[order])
        np.save(runs / f"run-{r:05d}.rank.npy", rank[order])
    return result


def _hits(clusters: int) -> np.ndarray:
    return np.sort(np.random.default_rng(1).choice(clusters, int(clusters * TOP_PCT / 100), replace=False))


def step_members(root: Path) -> dict:
    from laion_tasks.stages.dedup import Centroids
    from laion_tasks.stages.subset_rules import DedupPool

    centroids = Centroids.load(str(root / "centroids.npz"))
    runs = sorted(str(p)[: -len(".primary.npy")] for p in (root / "runs").glob("*.primary.npy"))

    def run() -> dict:
        members = DedupPool(centroids, runs, 0).members(_hits(centroids.n_leaves))
        np.save(root / "members.npy", members)
        return {"members": int(len(members)), "hit_clusters": int(len(_hits(centroids.n_leaves)))}

    return measured(run)


def step_narrow(root: Path, rows: int) -> dict:
    """The flag update over a scan table of ``rows`` samples by the hit clusters' ranks."""
    import pyarrow as pa

    from laion_tasks.stages.subset_rules import _MEMBERS, _narrow

    db = _db(root)
    db.con.execute(f"CREATE TEMP TABLE scan AS SELECT range AS _rank, 'eligible' AS base_outcome, true AS s0 "
                   f"FROM range({rows})").fetchall()
    members = np.load(root / "members.npy")

    def run() -> dict:
        db.con.register(_MEMBERS, pa.table({"rank": members}))
        dropped = _narrow(db, "scan", "s0", f"_rank IN (SELECT rank FROM {_MEMBERS})")
        return {"dropped": dropped, "kept": rows - dropped}

    return measured(run)


# ---------------------------------------------------------------- the parent


def child(python: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([python, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"step {args[0]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def per_row(step: dict, rows: int) -> dict:
    return {**step, "cpu_us_per_row": 1e6 * step["cpu_seconds"] / rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16_000_000)
    parser.add_argument("--per-shard", type=int, default=50_000)
    parser.add_argument("--cluster-size", type=int, default=1000)
    parser.add_argument("--assign-rows", type=int, default=None,
                        help="rows with embeddings, that the image rule trains on and assigns (default: --rows)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--no-record", action="store_true", help="print the figures; do not write bench/results")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        name, root = args.child[0], Path(args.child[1])
        steps = {
            "exact": lambda: step_exact(root),
            "sketch_map": lambda: step_sketch_map(root, root / "sketches"),
            "sketch_reduce": lambda: step_sketch_reduce(root / "sketches"),
            "train": lambda: step_train(root, int(args.child[2])),
            "assign": lambda: step_assign(root, int(args.child[2])),
            "members": lambda: step_members(root),
            "narrow": lambda: step_narrow(root, int(args.child[2])),
        }
        print(json.dumps(steps[name]()))
        return

    import collect_results as cr

    load_before = os.getloadavg()[0]
    root = args.workdir / f"subset-rules-bench-{args.rows}"
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    assign_rows = args.assign_rows or args.rows
    generate(root, args.rows, args.per_shard, seed=0, embedded_rows=assign_rows)
    print(f"generated {args.rows:,} rows in {time.perf_counter() - started:.0f}s", flush=True)
    py, sketch_py = sys.executable, str(SKETCH_VENV / "bin" / "python")
    if not Path(sketch_py).exists():
        raise SystemExit(f"{sketch_py} missing: python3 -m venv {SKETCH_VENV} && {SKETCH_VENV}/bin/pip install datasketches==5.2.0 pyarrow numpy")
    steps: dict[str, dict] = {}
    try:
        for name, python, extra in (("exact", py, []), ("sketch_map", sketch_py, []), ("sketch_reduce", sketch_py, []),
                                    ("train", py, [str(args.cluster_size)]), ("assign", py, [str(args.rows)]), ("members", py, []),
                                    ("narrow", py, [str(args.rows)])):
            steps[name] = per_row(child(python, name, str(root), *extra), assign_rows if name in ("train", "assign") else args.rows)
            print(name, json.dumps(steps[name]), flush=True)
        # the sketch's threshold against the exact distribution: which share of the rows it keeps
        import duckdb

        con = duckdb.connect()
        glob = str(root / SNAP / "clip" / "*.parquet")
        share = con.execute(f"SELECT avg((similarity >= {steps['sketch_reduce']['threshold']!r})::DOUBLE), "
                            f"avg((similarity >= {steps['exact']['threshold']!r})::DOUBLE) FROM read_parquet('{glob}')").fetchall()[0]
        steps["sketch_reduce"]["kept_share"], steps["exact"]["kept_share"] = float(share[0]), float(share[1])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    run = {
        "date": cr.now(),
        "command": f".venv/bin/python bench/subset_rules_bench.py --rows {args.rows}"
                   + (f" --assign-rows {assign_rows}" if assign_rows != args.rows else ""),
        "machine": cr.machine_info(load_before),
        "settings": {"rows": args.rows, "assign_rows": assign_rows, "per_shard": args.per_shard, "dim": DIM, "top_pct": TOP_PCT,
                     "cluster_size": args.cluster_size, "kll_k": SKETCH_K, "duckdb_memory_limit": "2GB"},
        "steps": steps,
        **render_parts(steps, args.rows, assign_rows),
    }
    if args.no_record:
        print(json.dumps(run, indent=1))
        return
    cr.save_run("subset_rules", run, title="Subset rules at snapshot scale (`bench/subset_rules_bench.py`)")


def render_parts(steps: dict, rows: int, assign_rows: int) -> dict:
    """The run's ``checks``, ``tables`` and ``notes`` (bench/README.md), from the measured steps."""
    gib = lambda kb: round(kb / 2**20, 2)  # noqa: E731
    sketch_cpu = steps["sketch_map"]["cpu_seconds"] + steps["sketch_reduce"]["cpu_seconds"]
    table_rows = [
        [name, what, round(s["cpu_seconds"], 1), round(s["cpu_us_per_row"], 3), gib(s["vmhwm_kb"]), gib(s["anon_peak_kb"])]
        for name, what, s in (
            ("percentile, exact (chosen)", "DuckDB quantile_disc over the clip table, one task", steps["exact"]),
            ("percentile, sketch: map", "a KLL sketch per shard, written to a file", steps["sketch_map"]),
            ("percentile, sketch: reduce", "merge the shard sketches, read the quantile", steps["sketch_reduce"]),
            ("image rule: train", "the rule's own centroids (when dedup's do not fit)", steps["train"]),
            ("image rule: assign", "every pool embedding to its cluster (the tree)", steps["assign"]),
            ("image rule: members", "dedup's clusters reused: ranks in the hit clusters", steps["members"]),
            ("image rule: narrow", "the subset flag over curate's scan table", steps["narrow"]),
        )
    ]
    exact, sketch = steps["exact"], steps["sketch_reduce"]
    return {
        "checks": [
            {"figure": f"percentile threshold (exact), CPU per row at {rows:,}", "value": exact["cpu_us_per_row"],
             "target": {"op": "<=", "value": 1.0, "text": "<= 1 us/row (a small share of curate's scan)"},
             "ours": f"{exact['cpu_us_per_row']:.3f} us/row", "peer": f"sketch {1e6 * sketch_cpu / rows:.3f} us/row"},
            {"figure": f"percentile threshold (exact), peak anonymous memory at {rows:,}", "value": gib(exact["anon_peak_kb"]),
             "target": {"op": "<=", "value": 1.5, "text": "<= 1.5 GiB (curate's DuckDB budget)"},
             "ours": f"{gib(exact['anon_peak_kb'])} GiB", "peer": f"sketch reduce {gib(sketch['anon_peak_kb'])} GiB"},
            {"figure": f"image rule: pool assignment, CPU per row at {assign_rows:,}", "value": steps["assign"]["cpu_us_per_row"],
             "target": {"op": "<=", "value": 100.0, "text": "<= 100 us/row"},
             "ours": f"{steps['assign']['cpu_us_per_row']:.1f} us/row",
             "peer": f"dedup's reused: {steps['members']['cpu_us_per_row'] + steps['narrow']['cpu_us_per_row']:.3f} us/row"},
        ],
        "tables": [{
            "title": f"Steps at {rows:,} rows, train and assign at {assign_rows:,} (child processes; CPU = user + system of all threads)",
            "columns": ["step", "what", "CPU s", "CPU us/row", "VmHWM GiB", "peak anon GiB"],
            "rows": table_rows,
        }],
        "notes": [
            f"Thresholds for the top {TOP_PCT:g}%: exact {exact['threshold']:.6f} (keeps {100 * exact['kept_share']:.3f}% of the "
            f"rows), KLL k={SKETCH_K} {sketch['threshold']:.6f} (keeps {100 * sketch['kept_share']:.3f}%; the sketch's "
            f"normalized rank error bound {100 * sketch['normalized_rank_error']:.2f}%).",
            "Chosen: the exact quantile. It is one task reading one float column, inside curate's DuckDB budget, with no "
            "per-shard step to schedule and no rank error; the sketches save memory the exact query does not need at this "
            "size and would add a map step to every shard.",
        ],
    }


if __name__ == "__main__":
    main()
