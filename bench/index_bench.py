"""kNN index benchmark: build time/memory, HTTP query latency and recall@40 vs exact search.

    .venv/bin/python bench/index_bench.py [--sizes 1000000 10000000] [--workdir /tmp/laion-index-bench]

Per size: synthetic clustered 512-d vectors are generated in chunks straight into fp16
``clip/<shard>.img.npy`` files (the CLIP stage's format) with a CLIP-like metadata
Parquet; ``build_index`` runs in a child process (its own peak RSS); exact top-40 ground
truth comes from chunked fp32 brute force (faiss.knn); then ``laion serve``'s app runs in
a uvicorn subprocess and queries go over loopback HTTP (POST /api/search with an
embedding, k=40, dedup off so recall measures the index). Baseline in the same run:
faiss exact flat search (IndexFlatIP, fp32, in memory) on the same data where it fits
in memory. Records the run in bench/results/index.json (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

K = 40
DIM = 512
LATENT = 32
CENTRES = 1000
LATENT_NOISE = 0.6
AMBIENT_NOISE = 0.15
"""Synthetic CLIP-like vectors: 1,000 clusters in a 32-d latent space (CLIP embeddings have
a low intrinsic dimension), projected to 512-d with a fixed random matrix, plus a little
isotropic 512-d noise, L2-normalised. Isotropic Gaussians in 512-d would have no neighbour
structure at all, which no ANN index (and no real embedding) shows."""


def _centres(dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12345)
    centres = rng.standard_normal((CENTRES, LATENT)).astype(np.float32)
    projection = rng.standard_normal((LATENT, dim)).astype(np.float32) / np.sqrt(LATENT)
    return centres, projection


def synth(n: int, dim: int, seed: int, centres: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    c, projection = centres
    rng = np.random.default_rng(seed)
    z = c[rng.integers(0, len(c), n)] + LATENT_NOISE * rng.standard_normal((n, LATENT), dtype=np.float32)
    x = z @ projection + (AMBIENT_NOISE / np.sqrt(dim)) * np.linalg.norm(z, axis=1, keepdims=True) * rng.standard_normal(
        (n, dim), dtype=np.float32
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(workdir: Path, n: int, shard_rows: int) -> tuple[list[str], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from laion_tasks import layout

    root = str(workdir / f"data-{n}")
    centres = _centres(DIM)
    emb_uris, clip_uris = [], []
    for s, start in enumerate(range(0, n, shard_rows)):
        rows = min(shard_rows, n - start)
        shard = layout.shard_name(s)
        emb_uri = layout.clip_image_emb_uri(root, "BENCH", shard)
        clip_uri = layout.clip_parquet_uri(root, "BENCH", shard)
        emb_uris.append(emb_uri)
        clip_uris.append(clip_uri)
        if Path(clip_uri).exists():
            continue
        Path(emb_uri).parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(emb_uri + ".tmp.npy", mode="w+", dtype=np.float16, shape=(rows, DIM))
        for c0 in range(0, rows, 250_000):
            c1 = min(c0 + 250_000, rows)
            out[c0:c1] = synth(c1 - c0, DIM, seed=start + c0, centres=centres).astype(np.float16)
        out.flush()
        del out
        os.replace(emb_uri + ".tmp.npy", emb_uri)
        ids = np.arange(start, start + rows)
        rng = np.random.default_rng(s)
        pq.write_table(
            pa.table(
                {
                    "key": [f"{i:012d}" for i in ids],
                    "uid": [f"{i:016x}" for i in ids],
                    "URL": [f"https://images.example.org/{i % 997}/{i}.jpg" for i in ids],
                    "TEXT": [f"synthetic caption number {i} of a benchmark sample" for i in ids],
                    "WIDTH": rng.integers(200, 2000, rows).astype(np.int32),
                    "HEIGHT": rng.integers(200, 2000, rows).astype(np.int32),
                    "similarity": rng.uniform(0.28, 0.4, rows).astype(np.float32),
                    "punsafe": rng.uniform(0, 1, rows).astype(np.float32),
                    "aesthetic": rng.uniform(3, 8, rows).astype(np.float32),
                    "has_embedding": np.ones(rows, dtype=bool),
                }
            ),
            clip_uri,
        )
    return emb_uris, clip_uris


def _build_child(emb_uris, clip_uris, out_dir, budget_gb, nprobe, queue) -> None:  # type: ignore[no-untyped-def]
    from laion_tasks.config import IndexConfig
    from laion_tasks.stages.index import build_index

    t0 = time.perf_counter()
    stats = build_index(emb_uris, clip_uris, out_dir, IndexConfig(memory_budget_gb=budget_gb, nprobe=nprobe))
    queue.put(
        {
            "wall_s": time.perf_counter() - t0,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "stats": stats.to_dict(),
        }
    )


def build(emb_uris: list[str], clip_uris: list[str], out_dir: str, budget_gb: float, nprobe: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_build_child, args=(emb_uris, clip_uris, out_dir, budget_gb, nprobe, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def exact_topk(emb_uris: list[str], queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact top-k over the stored fp16 vectors (as fp32), in 250k-row chunks; also its time."""
    import faiss

    best_d = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    offset = 0
    t0 = time.perf_counter()
    for uri in emb_uris:
        emb = np.load(uri, mmap_mode="r")
        for c0 in range(0, len(emb), 250_000):
            chunk = np.asarray(emb[c0 : c0 + 250_000], dtype=np.float32)
            chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
            d, i = faiss.knn(queries, chunk, k, metric=faiss.METRIC_INNER_PRODUCT)
            d_all = np.concatenate([best_d, d], axis=1)
            i_all = np.concatenate([best_i, i + offset + c0], axis=1)
            order = np.argsort(-d_all, axis=1)[:, :k]
            best_d = np.take_along_axis(d_all, order, axis=1)
            best_i = np.take_along_axis(i_all, order, axis=1)
        offset += len(emb)
    return best_i, time.perf_counter() - t0


def flat_baseline(emb_uris: list[str], queries: np.ndarray, max_bytes: float) -> dict | None:
    """faiss exact flat search, single-query latency, when the fp32 matrix fits ``max_bytes``."""
    import faiss

    n = sum(np.load(u, mmap_mode="r").shape[0] for u in emb_uris)
    if n * DIM * 4 > max_bytes:
        return None
    index = faiss.IndexFlatIP(DIM)
    for uri in emb_uris:
        emb = np.load(uri, mmap_mode="r")
        for c0 in range(0, len(emb), 250_000):
            chunk = np.asarray(emb[c0 : c0 + 250_000], dtype=np.float32)
            chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
            index.add(chunk)
    lat = []
    for q in queries[:100]:
        t0 = time.perf_counter()
        index.search(q[None], K)
        lat.append(time.perf_counter() - t0)
    del index
    return {"p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3)}


def recall_at_k(found: list[list[int]], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SERVER = """
import sys, uvicorn
sys.path.insert(0, {repo!r})
from laion_tasks.config import load_settings
from laion_tasks.serve import create_app
settings = load_settings(environ={{}}, overrides={{"index": {{"nprobe": {nprobe}, "k_factor": {k_factor}}}}})
uvicorn.run(create_app({index_dir!r}, settings), host="127.0.0.1", port={port}, log_level="warning")
"""


def rss_of(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "RssAnon", "RssFile")):
            name, value = line.split(":")
            out[name] = int(value.split()[0]) / 1024**2
    return out


def http_bench(index_dir: str, queries: np.ndarray, truth: np.ndarray, nprobe: int, k_factor: int) -> dict:
    import httpx

    port = free_port()
    code = SERVER.format(repo=str(REPO), index_dir=index_dir, port=port, nprobe=nprobe, k_factor=k_factor)
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = httpx.Client(base_url=url, timeout=60)
        body = lambda q: {"embedding": q.tolist(), "k": K, "dedup": False}  # noqa: E731
        for q in queries[:50]:  # warm-up: page the index in, start threads
            client.post("/api/search", json=body(q)).raise_for_status()
        lat, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            resp = client.post("/api/search", json=body(q))
            lat.append(time.perf_counter() - t0)
            resp.raise_for_status()
            found.append([r["id"] for r in resp.json()["results"]])
        # Throughput with 4 concurrent clients.
        done = [0]
        lock = threading.Lock()

        def worker(qs: np.ndarray) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                for q in qs:
                    c.post("/api/search", json=body(q)).raise_for_status()
                    with lock:
                        done[0] += 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(part,)) for part in np.array_split(queries, 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        qps = done[0] / (time.perf_counter() - t0)
        dedup_lat = []
        for q in queries[:200]:
            t0 = time.perf_counter()
            client.post("/api/search", json={"embedding": q.tolist(), "k": K, "dedup": True}).raise_for_status()
            dedup_lat.append(time.perf_counter() - t0)
        mem = rss_of(proc.pid)
        return {
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "qps_4_clients": qps,
            "recall_at_40": recall_at_k(found, truth, K),
            "dedup_p50_ms": float(np.percentile(dedup_lat, 50) * 1e3),
            "server_rss_gb": mem,
        }
    finally:
        proc.terminate()
        proc.wait(30)


def inprocess_sweep(index_dir: str, queries: np.ndarray, truth: np.ndarray) -> list[dict]:
    """Raw FAISS latency/recall (no HTTP, no metadata) over nprobe / k_factor."""
    from laion_tasks.serve.searcher import KnnIndex

    rows = []
    for nprobe, k_factor in ((16, 10), (32, 10), (64, 10), (64, 20)):
        knn = KnnIndex(index_dir, nprobe=nprobe, k_factor=k_factor)
        if knn.manifest["plan"]["key"] == "Flat" and rows:
            break
        for q in queries[:20]:
            knn.search(q, K)
        lat, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            _, ids = knn.search(q, K)
            lat.append(time.perf_counter() - t0)
            found.append(ids[0].tolist())
        rows.append(
            {
                "nprobe": nprobe,
                "k_factor": k_factor,
                "p50_ms": float(np.percentile(lat, 50) * 1e3),
                "p99_ms": float(np.percentile(lat, 99) * 1e3),
                "recall_at_40": recall_at_k(found, truth, K),
            }
        )
        del knn
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/laion-index-bench"))
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--queries-large", type=int, default=300, help="Queries above 2M vectors (exact ground truth is costly).")
    parser.add_argument("--memory-budget-gb", type=float, default=6.0)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--k-factor", type=int, default=20)
    parser.add_argument("--flat-baseline-max-gb", type=float, default=2.5)
    parser.add_argument("--reuse-index", action="store_true", help="Keep an index already built in --workdir (and its recorded build figures).")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "index.json",
                        help="the JSON record (bench/README.md)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    saved = args.workdir / "results.json"
    previous = json.loads(saved.read_text()) if saved.exists() else []
    results = [r for r in previous if r["n"] not in args.sizes]
    for n in args.sizes:
        print(f"== {n:,} vectors", flush=True)
        t0 = time.perf_counter()
        emb_uris, clip_uris = make_data(args.workdir, n, shard_rows=min(n, 1_000_000))
        gen_s = time.perf_counter() - t0
        n_queries = args.queries if n <= 2_000_000 else min(args.queries, args.queries_large)
        queries = synth(n_queries, DIM, seed=10**12, centres=_centres(DIM))
        truth, exact_s = exact_topk(emb_uris, queries, K)
        print(f"data {gen_s:.0f}s, exact ground truth {exact_s:.0f}s", flush=True)
        out_dir = str(args.workdir / f"index-{n}")
        earlier = next((r["built"] for r in previous if r["n"] == n), None)
        if args.reuse_index and earlier and Path(out_dir, "index.json").exists():
            built = earlier
        else:
            built = build(emb_uris, clip_uris, out_dir, args.memory_budget_gb, args.nprobe)
        print(json.dumps(built, indent=1), flush=True)
        sweep = inprocess_sweep(out_dir, queries, truth)
        print(json.dumps(sweep, indent=1), flush=True)
        http = http_bench(out_dir, queries, truth, args.nprobe, args.k_factor)
        print(json.dumps(http, indent=1), flush=True)
        flat = flat_baseline(emb_uris, queries, args.flat_baseline_max_gb * 1024**3)
        print("flat baseline", flat, flush=True)
        index_bytes = sum(p.stat().st_size for p in Path(out_dir).iterdir())
        results.append(
            {
                "n": n,
                "gen_s": gen_s,
                "exact_s": exact_s,
                "built": built,
                "sweep": sweep,
                "http": http,
                "flat": flat,
                "index_gb": index_bytes / 1024**3,
                "queries": n_queries,
                "served": {"nprobe": args.nprobe, "k_factor": args.k_factor},
            }
        )
        results.sort(key=lambda r: r["n"])
        saved.write_text(json.dumps(results, indent=1))
    write_report(args, results)


def write_report(args: argparse.Namespace, results: list[dict]) -> None:
    """Record the run in bench/results/index.json (bench/README.md); collect_results.py renders RESULTS.md."""
    sys.path.insert(0, str(REPO / "bench"))
    from collect_results import machine_info, now, save_run

    sizes = []
    for r in results:
        h, b, f = r["http"], r["built"], r["flat"]
        mem = h.get("server_rss_gb", {})
        sizes.append({
            "n": r["n"], "index_key": b["stats"]["extra"]["index_key"],
            "served": r.get("served", {"nprobe": args.nprobe, "k_factor": args.k_factor}),
            "build_s": b["wall_s"], "build_peak_rss_gb": b["peak_rss_gb"], "index_gb": r["index_gb"],
            "build_phases_s": {k: v for k, v in b["stats"]["extra"].items() if k.endswith("_s")},
            "http": {"p50_ms": h["p50_ms"], "p99_ms": h["p99_ms"], "qps_4_clients": h["qps_4_clients"],
                     "recall_at_40": h["recall_at_40"], "server_rss_anon_gb": mem.get("RssAnon", 0.0),
                     "server_rss_file_gb": mem.get("RssFile", 0.0)},
            "flat_p50_ms": f["p50_ms"] if f else None,
            "flat_over_ours_p50": f["p50_ms"] / h["p50_ms"] if f else None,
            "sweep": r["sweep"], "queries": r.get("queries", args.queries), "exact_s": r["exact_s"],
        })
    setup = (
        f"Data: synthetic 512-d unit vectors: {CENTRES:,} Gaussian clusters in a {LATENT}-d latent space projected to "
        "512-d plus small isotropic noise (CLIP-like low intrinsic dimension), stored fp16 as the CLIP stage writes "
        "them; queries drawn from the same distribution. Not real CLIP embeddings: recall on real data may differ. "
        f"Index: automatic choice with memory_budget_gb={args.memory_budget_gb}; served with the nprobe / k_factor in "
        f"the table. HTTP: loopback POST /api/search with an embedding, k={K}, dedup off, metadata rows included; 1 "
        "client for latency, 4 clients for QPS. Baseline: FAISS exact flat search (IndexFlatIP, fp32, in RAM, "
        "in-process, no HTTP), where the fp32 matrix fits; ground truth for recall is chunked exact search over all "
        "vectors."
    )
    save_run(args.out.stem, {
        "date": now(), "command": " ".join([".venv/bin/python bench/index_bench.py", *sys.argv[1:]]),
        "machine": machine_info(), "setup": setup,
        "settings": {"memory_budget_gb": args.memory_budget_gb, "k": K, "centres": CENTRES, "latent": LATENT, "dim": DIM},
        "sizes": sizes,
    }, title="kNN index (`bench/index_bench.py`)", results_dir=args.out.parent)
    print(json.dumps(sizes, indent=1))
    print(f"recorded in {args.out}")


if __name__ == "__main__":
    main()
